//! The agent's [`Dialer`]: an awc client over openssl (CA, client certificate, hostname
//! verification, ALPN `http/1.1`) and a fresh clinic-signed token for every attempt.

use std::time::Duration;

use openssl::ssl::SslConnector;
use tether_actors::ports::{Dialer, PortError};

use super::jwt::TokenSigner;

pub struct SecureDialer {
    connector: Option<SslConnector>,
    signer: Option<TokenSigner>,
    timeout: Duration,
    proxy: Option<crate::proxy::Proxy>,
}

impl SecureDialer {
    pub fn new(
        connector: Option<SslConnector>,
        signer: Option<TokenSigner>,
        timeout: Duration,
    ) -> Self {
        SecureDialer {
            connector,
            signer,
            timeout,
            proxy: None,
        }
    }

    /// The key id its tokens carry (`None`: no tokens).
    pub fn kid(&self) -> Option<&str> {
        self.signer.as_ref().map(|s| s.kid())
    }

    /// Tunnel every connection through this HTTP CONNECT proxy.
    pub fn with_proxy(mut self, proxy: Option<crate::proxy::Proxy>) -> Self {
        self.proxy = proxy;
        self
    }
}

impl Dialer for SecureDialer {
    fn client(&self) -> awc::Client {
        let b = awc::Client::builder().timeout(self.timeout);
        match (&self.proxy, &self.connector) {
            (Some(p), tls) => {
                let connector = awc::Connector::new()
                    .connector(crate::proxy::ProxyConnector::new(p.clone(), self.timeout))
                    .timeout(self.timeout);
                match tls {
                    Some(c) => b.connector(connector.openssl(c.clone())).finish(),
                    None => b.connector(connector).finish(),
                }
            }
            (None, Some(c)) => b
                .connector(
                    awc::Connector::new()
                        .openssl(c.clone())
                        .timeout(self.timeout),
                )
                .finish(),
            (None, None) => b.finish(),
        }
    }

    fn headers(&self) -> Result<Vec<(String, String)>, PortError> {
        match &self.signer {
            None => Ok(Vec::new()),
            Some(s) => {
                let token = s.sign().map_err(|e| PortError::new(e.to_string()))?;
                Ok(vec![("Authorization".into(), format!("Bearer {token}"))])
            }
        }
    }

    fn credential_lifetime(&self) -> Option<Duration> {
        self.signer.as_ref().map(|s| s.lifetime())
    }
}
