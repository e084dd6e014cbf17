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
        }
    }
}

impl Dialer for SecureDialer {
    fn client(&self) -> awc::Client {
        let b = awc::Client::builder().timeout(self.timeout);
        match &self.connector {
            Some(c) => b
                .connector(
                    awc::Connector::new()
                        .openssl(c.clone())
                        .timeout(self.timeout),
                )
                .finish(),
            None => b.finish(),
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
