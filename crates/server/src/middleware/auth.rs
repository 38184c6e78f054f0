//! API keys with scopes: the settings, the keys file, and the layer that checks them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Request};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tonic::Status;
use tower::Layer;

use super::{Answer, HEALTH_PREFIX, Inner, Intercept, Intercepted, status_response};

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `EventService`.
    Ingest,
    /// `RecommendService`.
    Recommend,
    /// Everything, including `CatalogService` and `ProfileService`.
    Admin,
}

/// One API key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds it; logged instead of the key.
    pub name: String,
    /// The secret itself; never logged, masked by `reflex config`.
    pub key: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// Authentication settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a key on every call but health checks and reflection.
    pub enabled: bool,
    /// Keys given inline (prefer `keys_file` or the environment for real secrets).
    pub keys: Vec<ApiKey>,
    /// A TOML file of `[[keys]]` tables with `name`, `key` and `scopes`.
    pub keys_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<ApiKey>,
}

impl AuthConfig {
    /// Every key: inline ones and those of `keys_file`.
    pub fn load_keys(&self) -> anyhow::Result<Vec<ApiKey>> {
        use anyhow::Context as _;
        let mut keys = self.keys.clone();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API keys file {}", path.display()))?;
            let file: KeysFile = toml::from_str(&text)
                .with_context(|| format!("parsing the API keys file {}", path.display()))?;
            keys.extend(file.keys);
        }
        if let Some(bad) = keys.iter().find(|k| k.key.len() < 16) {
            anyhow::bail!("API key {:?} is shorter than 16 characters", bad.name);
        }
        Ok(keys)
    }
}

/// The scope a method needs; `None` for calls open to all (health, reflection).
fn required_scope(path: &str) -> Option<Scope> {
    if path.starts_with(HEALTH_PREFIX) || path.starts_with("/grpc.reflection.") {
        None
    } else if path.starts_with("/reflex.v1.EventService/") {
        Some(Scope::Ingest)
    } else if path.starts_with("/reflex.v1.RecommendService/") {
        Some(Scope::Recommend)
    } else {
        Some(Scope::Admin)
    }
}

struct Key {
    name: String,
    secret: Vec<u8>,
    scopes: HashSet<Scope>,
}

/// API keys with scopes, read from `x-api-key` or `authorization: Bearer …`: no key (or
/// an unknown one) is `UNAUTHENTICATED`, a key without the method's scope is
/// `PERMISSION_DENIED`. Every key is compared in constant time.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<Vec<Key>>,
}

impl AuthLayer {
    /// Checks calls against `keys`.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        let keys = keys
            .into_iter()
            .map(|k| Key {
                name: k.name,
                secret: k.key.into_bytes(),
                scopes: k.scopes.into_iter().collect(),
            })
            .collect();
        Self {
            keys: Arc::new(keys),
        }
    }

    fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), Status> {
        match required_scope(path) {
            Some(scope) => self.authorize(headers, scope),
            None => Ok(()),
        }
    }

    /// Checks the key `headers` present for `scope`, as gRPC calls are checked: the web
    /// console's admin actions (HTTP, not gRPC) use it.
    pub fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<(), Status> {
        let presented = headers
            .get("x-api-key")
            .map(HeaderValue::as_bytes)
            .or_else(|| {
                headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            })
            .ok_or_else(|| Status::unauthenticated("an API key is required (x-api-key header)"))?;
        // Compare against every key so timing tells nothing about which one nearly matched.
        let mut found = None;
        for key in self.keys.iter() {
            if bool::from(key.secret.as_slice().ct_eq(presented)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        if key.scopes.contains(&scope) || key.scopes.contains(&Scope::Admin) {
            Ok(())
        } else {
            tracing::debug!(key = %key.name, ?scope, "key lacks scope");
            Err(Status::permission_denied(format!(
                "API key {:?} lacks the {scope:?} scope this method needs",
                key.name
            )))
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intercepted::new(inner, self.clone())
    }
}

/// The service of [`AuthLayer`].
pub type Auth<S> = Intercepted<S, AuthLayer>;

impl<S: Inner<B, RB>, B, RB: Default + Send + 'static> Intercept<S, B, RB> for AuthLayer {
    fn intercept(&self, inner: &mut S, request: Request<B>) -> Answer<S, B> {
        match self.check(request.headers(), request.uri().path()) {
            Ok(()) => Box::pin(inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status_response(status)) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_services() {
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_scope("/reflex.v1.EventService/Stream"),
            Some(Scope::Ingest)
        );
        assert_eq!(
            required_scope("/reflex.v1.RecommendService/Recommend"),
            Some(Scope::Recommend)
        );
        assert_eq!(
            required_scope("/reflex.v1.CatalogService/UpsertItems"),
            Some(Scope::Admin)
        );
    }

    #[test]
    fn auth_distinguishes_missing_unknown_and_unscoped_keys() {
        let auth = AuthLayer::new(vec![ApiKey {
            name: "shop".into(),
            key: "0123456789abcdef".into(),
            scopes: vec![Scope::Recommend],
        }]);
        let mut h = HeaderMap::new();
        let path = "/reflex.v1.RecommendService/Recommend";
        assert_eq!(
            auth.check(&h, path).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        h.insert("x-api-key", HeaderValue::from_static("0123456789abcdeX"));
        assert_eq!(
            auth.check(&h, path).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        h.insert("x-api-key", HeaderValue::from_static("0123456789abcdef"));
        assert!(auth.check(&h, path).is_ok());
        let err = auth
            .check(&h, "/reflex.v1.EventService/Stream")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            !err.message().contains("0123456789abcdef"),
            "never echo the key"
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(
            "authorization",
            HeaderValue::from_static("Bearer 0123456789abcdef"),
        );
        assert!(auth.check(&bearer, path).is_ok());
        assert!(
            auth.check(&HeaderMap::new(), "/grpc.health.v1.Health/Check")
                .is_ok()
        );
    }
}
