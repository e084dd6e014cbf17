//! Every route the gateway serves, in one table: registered from it, listed from it, and
//! checked against the OpenAPI file (`schemas/openapi.json`) by `tests/openapi.rs`, so the
//! spec cannot miss a route nor describe one that does not exist.

use actix_web::http::Method;
use actix_web::{web, FromRequest, Handler, Responder, Route};

use super::{api, channels, enrolment, monitor, session};

/// The OpenAPI 3.1 description of this API, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../schemas/openapi.json");

pub struct Table(Vec<(Method, &'static str, Route)>);

impl Table {
    fn add<F, Args>(&mut self, method: Method, path: &'static str, handler: F)
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.0
            .push((method.clone(), path, web::method(method).to(handler)));
    }
}

fn table() -> Table {
    let mut t = Table(Vec::new());
    let (get, post) = (Method::GET, Method::POST);
    t.add(get.clone(), "/", monitor::dashboard);
    t.add(get.clone(), "/healthz", api::healthz);
    t.add(get.clone(), "/readyz", api::readyz);
    t.add(get.clone(), "/metrics", monitor::metrics);
    t.add(get.clone(), "/v1/openapi.json", openapi);
    t.add(get.clone(), "/v1/ws", session::upgrade);
    t.add(post.clone(), "/v1/http/open", session::http::open);
    t.add(post.clone(), "/v1/http/{channel}/send", session::http::send);
    t.add(get.clone(), "/v1/http/{channel}/poll", session::http::poll);
    t.add(
        post.clone(),
        "/v1/http/{channel}/close",
        session::http::close,
    );
    t.add(get.clone(), "/v1/clinics", api::list_clinics);
    t.add(get.clone(), "/v1/clinics/{id}", api::get_clinic);
    t.add(post.clone(), "/v1/clinics/{id}/updates", api::post_update);
    t.add(get.clone(), "/v1/clinics/{id}/updates", api::list_updates);
    t.add(post.clone(), "/v1/clinics/{id}/rpc", api::post_rpc);
    t.add(
        post.clone(),
        "/v1/clinics/{id}/source-reset",
        api::source_reset,
    );
    t.add(get.clone(), "/v1/events", api::list_events);
    t.add(get.clone(), "/v1/nodes", api::list_nodes);
    t.add(get.clone(), "/v1/registry/clinics", api::list_registry);
    t.add(
        Method::PUT,
        "/v1/registry/clinics/{id}",
        api::put_registry_clinic,
    );
    t.add(
        Method::DELETE,
        "/v1/registry/clinics/{id}",
        api::delete_registry_clinic,
    );
    t.add(
        post.clone(),
        "/v1/registry/clinics/{id}/enrolment-codes",
        enrolment::create_code,
    );
    t.add(
        get.clone(),
        "/v1/registry/clinics/{id}/enrolment-codes",
        enrolment::list_codes,
    );
    t.add(
        Method::DELETE,
        "/v1/registry/clinics/{id}/enrolment-codes",
        enrolment::withdraw_codes,
    );
    t.add(post.clone(), "/v1/enrol", enrolment::enrol);
    t.add(post.clone(), "/v1/enrol/renew", enrolment::renew);
    t.add(post.clone(), "/v1/enrol/retire", enrolment::retire);
    t.add(post.clone(), "/v1/updates", api::post_fan_out);
    t.add(get.clone(), "/v1/update-batches/{id}", api::get_batch);
    t.add(get.clone(), "/v1/updates/{id}", api::get_update);
    t.add(Method::DELETE, "/v1/updates/{id}", api::cancel_update);
    t.add(get.clone(), "/v1/webhooks", api::list_webhooks);
    t.add(
        post.clone(),
        "/v1/webhooks/{name}/replay",
        api::replay_webhook,
    );
    t.add(
        get.clone(),
        "/v1/webhooks/{name}/dead-letters",
        api::list_dead_letters,
    );
    t.add(
        post.clone(),
        "/v1/webhooks/{name}/dead-letters/{id}/replay",
        api::replay_dead_letter,
    );
    t.add(get.clone(), "/v1/channels", channels::list);
    t.add(get.clone(), "/v1/channels/stream", channels::stream);
    t.add(
        get.clone(),
        "/v1/channels/messages/{id}",
        channels::get_message,
    );
    t.add(post.clone(), "/v1/channels/{name}", channels::post_fan_out);
    t.add(
        post.clone(),
        "/v1/clinics/{id}/channels/{name}",
        channels::post_clinic,
    );
    t.add(get.clone(), "/v1/stream/lifecycle", monitor::lifecycle);
    t.add(get, "/v1/stream/fleet", monitor::fleet);
    t
}

/// Registers every route.
pub fn register(cfg: &mut web::ServiceConfig) {
    for (_, path, route) in table().0 {
        cfg.route(path, route);
    }
}

/// (method, path template) of every route, in registration order.
pub fn endpoints() -> Vec<(Method, &'static str)> {
    table().0.into_iter().map(|(m, p, _)| (m, p)).collect()
}

async fn openapi() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}
