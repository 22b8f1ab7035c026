//! Pulling from a registry with the OCI distribution API: manifests (an
//! index picks linux/amd64), the config and layer blobs, each checked
//! against its digest. Bearer-token and basic auth; plain HTTP only for
//! localhost or when the caller says the registry is insecure.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::archive::{is_index, linux_amd64, MAX_JSON};
use crate::digest::{verify, Digest, Hashing};
use crate::reference::{Reference, Version, DEFAULT_REGISTRY};
use crate::{io, Error, Result};

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// A connection that stalls this long fails the pull rather than hang it.
const STALL: Duration = Duration::from_secs(60);

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Plain HTTP for this registry even if it is not localhost.
    pub insecure: bool,
    /// `user:password` for basic auth or to get a token.
    pub credentials: Option<String>,
}

/// One repository of one registry, with the token it was given.
pub struct Registry {
    agent: ureq::Agent,
    base: String,
    repository: String,
    credentials: Option<String>,
    authorization: Option<String>,
}

impl Registry {
    pub fn new(reference: &Reference, access: &Access) -> Self {
        let host = match reference.registry.as_str() {
            DEFAULT_REGISTRY => "registry-1.docker.io",
            host => host,
        };
        let local = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .any(|l| host == *l || host.starts_with(&format!("{l}:")));
        let scheme = if local || access.insecure {
            "http"
        } else {
            "https"
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(STALL))
            .timeout_recv_response(Some(STALL))
            .timeout_recv_body(None)
            .build()
            .new_agent();
        Self {
            agent,
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            repository: reference.repository.clone(),
            credentials: access.credentials.clone(),
            authorization: None,
        }
    }

    /// The manifest `version` names, through indexes to linux/amd64,
    /// checked against its digest; and that digest.
    pub fn manifest(&mut self, version: &Version) -> Result<(Vec<u8>, Digest)> {
        let mut wanted = match version {
            Version::Tag(tag) => tag.clone(),
            Version::Digest(digest) => digest.to_string(),
        };
        for _ in 0..4 {
            let url = format!("{}/manifests/{wanted}", self.base);
            let mut response = self.get(&url, Some(MANIFEST_TYPES))?;
            let media = header(&response, "content-type").unwrap_or_default();
            let bytes = read_limited(&mut response, MAX_JSON, &url)?;
            let digest = Digest::of(&bytes);
            if let Ok(expected) = Digest::parse(&wanted) {
                verify(&url, &expected, &digest)?;
            }
            let media = match media.is_empty() {
                true => media_of(&bytes),
                false => media,
            };
            if !is_index(&media) {
                return Ok((bytes, digest));
            }
            wanted = amd64(&bytes, &url)?.to_string();
        }
        Err(Error::bad(&self.base, "indexes nested too deep"))
    }

    /// A small blob (a config), checked against its digest.
    pub fn json_blob(&mut self, digest: &Digest) -> Result<Vec<u8>> {
        let url = format!("{}/blobs/{digest}", self.base);
        let mut response = self.get(&url, None)?;
        let bytes = read_limited(&mut response, MAX_JSON, &url)?;
        verify(&url, digest, &Digest::of(&bytes))?;
        Ok(bytes)
    }

    /// Downloads a blob into `out`, checked against its digest, calling
    /// `progress` with the bytes so far.
    pub fn download(
        &mut self,
        digest: &Digest,
        size: u64,
        out: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let url = format!("{}/blobs/{digest}", self.base);
        let mut response = self.get(&url, None)?;
        let mut body = Hashing::new(
            response
                .body_mut()
                .with_config()
                .limit(size.saturating_add(1))
                .reader(),
        );
        let mut file = File::create(out).map_err(io(out.display()))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(&url)(e)),
            };
            file.write_all(&buf[..n]).map_err(io(out.display()))?;
            done += n as u64;
            progress(done);
        }
        let (actual, len) = body.finish().map_err(io(&url))?;
        if len != size {
            return Err(Error::bad(
                &url,
                format!("{len} bytes, the manifest says {size}"),
            ));
        }
        verify(&url, digest, &actual)
    }

    /// A GET that authenticates once if the registry asks it to.
    fn get(&mut self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut response = self.send(url, accept)?;
        if response.status() == 401 {
            let challenge = header(&response, "www-authenticate").unwrap_or_default();
            self.authorization = Some(self.authorize(&challenge, url)?);
            response = self.send(url, accept)?;
        }
        match response.status().as_u16() {
            200..=299 => Ok(response),
            404 => Err(Error::bad(url, "not found in the registry")),
            401 | 403 => Err(Error::bad(
                url,
                "access denied (credentials: --creds USER:PASSWORD)",
            )),
            status => Err(Error::bad(
                url,
                format!("the registry answered HTTP {status}"),
            )),
        }
    }

    fn send(&self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.agent.get(url);
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        request
            .call()
            .map_err(|e| Error::bad(url, format!("cannot reach the registry: {e}")))
    }

    /// The Authorization header a 401's challenge asks for: basic with the
    /// credentials, or a bearer token from the challenge's realm.
    fn authorize(&self, challenge: &str, url: &str) -> Result<String> {
        let basic = || {
            self.credentials
                .as_deref()
                .map(|c| format!("Basic {}", BASE64.encode(c)))
                .ok_or_else(|| {
                    Error::bad(
                        url,
                        "the registry asks for credentials (--creds USER:PASSWORD)",
                    )
                })
        };
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return basic();
        };
        let params = challenge_params(params);
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let realm =
            get("realm").ok_or_else(|| Error::bad(url, "a bearer challenge without a realm"))?;
        let scope = get("scope").map_or_else(
            || format!("repository:{}:pull", self.repository),
            str::to_string,
        );
        let mut request = self.agent.get(realm).query("scope", &scope);
        if let Some(service) = get("service") {
            request = request.query("service", service);
        }
        if let Ok(header) = basic() {
            request = request.header("Authorization", &header);
        }
        let mut response = request
            .call()
            .map_err(|e| Error::bad(realm, format!("cannot reach the token service: {e}")))?;
        if response.status() != 200 {
            return Err(Error::bad(
                realm,
                format!("the token service answered HTTP {}", response.status()),
            ));
        }
        let body = read_limited(&mut response, MAX_JSON, realm)?;
        let token: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::bad(realm, format!("not a token: {e}")))?;
        let token = token["token"]
            .as_str()
            .or(token["access_token"].as_str())
            .ok_or_else(|| Error::bad(realm, "no token in the answer"))?;
        Ok(format!("Bearer {token}"))
    }
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    let value = response.headers().get(name)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or(value).trim().to_string())
}

fn read_limited(
    response: &mut ureq::http::Response<ureq::Body>,
    limit: u64,
    url: &str,
) -> Result<Vec<u8>> {
    response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| Error::bad(url, format!("reading the answer: {e}")))
}

/// The mediaType a manifest names itself, where the registry sent none.
fn media_of(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    value["mediaType"].as_str().unwrap_or_default().to_string()
}

/// The linux/amd64 manifest of an index.
fn amd64(bytes: &[u8], url: &str) -> Result<Digest> {
    let index: oci_spec::image::ImageIndex = serde_json::from_slice(bytes)
        .map_err(|e| Error::bad(url, format!("not an image index: {e}")))?;
    Digest::parse(linux_amd64(&index, url)?.digest().as_ref())
}

/// `realm="https://auth",service="reg",scope="repository:x:pull"`.
fn challenge_params(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.push((key, value.to_string()));
        rest = tail.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let params = challenge_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(get("service"), Some("registry.docker.io"));
        assert_eq!(get("scope"), Some("repository:library/busybox:pull"));
    }

    #[test]
    fn plain_http_only_for_localhost_or_when_insecure() {
        let r = |s: &str| Reference::parse(s).unwrap();
        let base = |s: &str, insecure| {
            Registry::new(
                &r(s),
                &Access {
                    insecure,
                    credentials: None,
                },
            )
            .base
        };
        assert_eq!(
            base("localhost:5000/t:1", false),
            "http://localhost:5000/v2/t"
        );
        assert_eq!(
            base("127.0.0.1:5000/t:1", false),
            "http://127.0.0.1:5000/v2/t"
        );
        assert_eq!(base("example.com/t:1", false), "https://example.com/v2/t");
        assert_eq!(base("example.com/t:1", true), "http://example.com/v2/t");
        assert_eq!(
            base("busybox", false),
            "https://registry-1.docker.io/v2/library/busybox"
        );
    }
}
