//! A small blocking S3 client: the calls the runtime's operators make (list a prefix, get an
//! object or a byte range of it, put, copy, delete) and the controller's (delete everything
//! under a prefix), each a plain function call on the caller's thread. It wraps `aws-sdk-s3`
//! and owns a small tokio runtime that drives the requests, so it may be used from any
//! thread, inside another tokio runtime too (from `spawn_blocking`, or blocking a worker
//! thread as any blocking call does).
//!
//! Settings come from the job's `spec.s3` where given, and otherwise from the standard AWS
//! environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles). Credentials are the ones given
//! to [`S3Client::with_credentials`] (the controller reads them from the Secret that
//! `spec.s3.credentialsSecret` names), or else the environment's (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles, web identity). Errors name the
//! operation, the bucket and the key, with the S3 error code and message; they never contain
//! credentials.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, ProvideCredentials, Region, RequestChecksumCalculation,
    ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_smithy_http_client::tls;
use weir_crds::streamjob::{RequestChecksums, S3Spec};

use crate::error::RuntimeError;

/// A blocking S3 client. Cheap to clone: clones share one SDK client and one runtime.
#[derive(Clone)]
pub struct S3Client {
    inner: Arc<Inner>,
}

struct Inner {
    client: aws_sdk_s3::Client,
    /// Drives the requests (on the runtime's worker thread).
    handle: tokio::runtime::Handle,
    _rt: RuntimeOwner,
    /// Where requests go, for messages (without any user info); `None`: AWS S3.
    endpoint: Option<String>,
    region: String,
    path_style: bool,
    /// Whether the credentials were given ([`S3Client::with_credentials`]) rather than found
    /// in the environment, for the hints of refused credentials.
    explicit_credentials: bool,
}

/// Owns the client's runtime and shuts it down without waiting when dropped: dropping a
/// runtime the ordinary way blocks until its threads end, which panics inside an async
/// context, and the last clone of a client may go there (on a worker thread of the caller's
/// runtime, or of the client's own when a part upload held it). Outside one (on a plain
/// thread, in `spawn_blocking`) it makes no difference.
struct RuntimeOwner(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeOwner {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("S3Client")
            .field("endpoint", &self.inner.endpoint.as_deref().unwrap_or("AWS S3"))
            .field("region", &self.inner.region)
            .field("force_path_style", &self.inner.path_style)
            .field("explicit_credentials", &self.inner.explicit_credentials)
            .finish_non_exhaustive()
    }
}

/// Static S3 credentials, given to [`S3Client::with_credentials`] instead of the ones of the
/// process environment. `Debug` shows the access key id only, never the secret key or the
/// session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS); `None` for long-term keys.
    pub session_token: Option<String>,
}

impl Credentials {
    /// Long-term keys, without a session token.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("session_token", &self.session_token.as_ref().map(|_| "** redacted **"))
            .finish()
    }
}

/// Bytes per request when [`S3Client::put_file`] uploads a file (the size of a multipart
/// upload's parts; S3 wants at least 5 MiB for every part but the last).
pub const UPLOAD_PART: usize = 8 << 20;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// The entity tag, quoted as S3 sends it (for `If-Match`).
    pub etag: Option<String>,
}

/// Sends part `n` of multipart upload `id`; the part as the upload's completion names it.
async fn upload_part(
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    id: String,
    n: i32,
    piece: Vec<u8>,
) -> Result<
    CompletedPart,
    SdkError<aws_sdk_s3::operation::upload_part::UploadPartError, HttpResponse>,
> {
    let out = client
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .part_number(n)
        .body(ByteStream::from(piece))
        .send()
        .await?;
    Ok(CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_string)).build())
}

/// `s3://bucket/key`, for messages.
fn location(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

/// An endpoint URL without user info (`http://user:secret@host` → `http://host`).
fn redact_endpoint(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl S3Client {
    /// Builds a client from `spec` (the job's `spec.s3`) over the standard AWS environment,
    /// and checks that a region and credentials are there. The endpoint is not contacted.
    pub fn new(spec: Option<&S3Spec>) -> Result<S3Client, RuntimeError> {
        Self::with_credentials(spec, None)
    }

    /// Builds a client as [`S3Client::new`] does, signing with `credentials` when given
    /// instead of looking for credentials in the environment; `None` is [`S3Client::new`].
    /// The region and the endpoint still come from `spec`, then the environment. The endpoint
    /// is not contacted: wrong keys show at the first request.
    pub fn with_credentials(
        spec: Option<&S3Spec>,
        credentials: Option<Credentials>,
    ) -> Result<S3Client, RuntimeError> {
        if let Some(c) = &credentials
            && (c.access_key_id.trim().is_empty() || c.secret_access_key.trim().is_empty())
        {
            return Err(RuntimeError::user(
                "S3: the access key id or the secret access key given is empty (in Kubernetes: check the keys of spec.s3.credentialsSecret)",
            ));
        }
        let explicit_credentials = credentials.is_some();
        let default_spec = S3Spec::default();
        let spec = spec.unwrap_or(&default_spec);
        if let Some(e) = &spec.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(RuntimeError::user(format!(
                "spec.s3.endpoint {:?} is not a URL: write http://host:port or https://host",
                redact_endpoint(e)
            )));
        }
        if spec.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(RuntimeError::user(
                "spec.s3.region is empty: name a region (for example us-east-1) or leave it out",
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weir-s3")
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::internal(format!("S3: starting the I/O runtime: {e}")))?;
        let handle = rt.handle().clone();
        let rt = RuntimeOwner(Some(rt));
        // rustls on ring; the connector speaks plain HTTP too.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        // Explicit limits: a request that hangs fails (and is retried) instead of holding a
        // checkpoint forever; transient errors and throttling are retried with backoff.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_attempt_timeout(std::time::Duration::from_secs(120))
            .build();
        let retries = aws_config::retry::RetryConfig::standard().with_max_attempts(4);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(r) = &spec.region {
            loader = loader.region(Region::new(r.trim().to_string()));
        }
        if let Some(e) = &spec.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        if let Some(c) = credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                c.session_token,
                None,
                "weir-explicit",
            ));
        }
        let sdk = block_on(&handle, loader.load());
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(RuntimeError::user(
                "S3: no region is set: set spec.s3.region in the job, or AWS_REGION in the environment",
            ));
        };
        let Some(credentials) = sdk.credentials_provider() else {
            return Err(no_credentials("no credentials provider is configured"));
        };
        if let Err(e) = block_on(&handle, async move { credentials.provide_credentials().await }) {
            return Err(no_credentials(&causes(&e)));
        }
        let endpoint = sdk
            .endpoint_url()
            .map(str::to_string)
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
            .map(|e| redact_endpoint(&e));
        let path_style = spec.force_path_style.unwrap_or(endpoint.is_some());
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(path_style);
        if spec.request_checksums == RequestChecksums::WhenRequired {
            conf = conf
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        Ok(S3Client {
            inner: Arc::new(Inner {
                client,
                handle,
                _rt: rt,
                endpoint,
                region,
                path_style,
                explicit_credentials,
            }),
        })
    }

    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        block_on(&self.inner.handle, fut)
    }

    /// Starts a multipart upload of `key`; its upload id. `what` names the object in errors.
    fn start_upload(&self, bucket: &str, key: &str, what: &str) -> Result<String, RuntimeError> {
        let (client, b, k) = (self.inner.client.clone(), bucket.to_string(), key.to_string());
        self.run(async move { client.create_multipart_upload().bucket(b).key(k).send().await })
            .map_err(|e| self.error("starting an upload of", what, e))?
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| {
                RuntimeError::external(format!("S3 writing {what}: the server gave no upload id"))
            })
    }

    /// Completes the multipart upload `id` of `key` from its parts, in order.
    fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        parts: Vec<CompletedPart>,
        what: &str,
    ) -> Result<(), RuntimeError> {
        let (client, b, k, id) =
            (self.inner.client.clone(), bucket.to_string(), key.to_string(), id.to_string());
        let done = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        self.run(async move {
            client
                .complete_multipart_upload()
                .bucket(b)
                .key(k)
                .upload_id(id)
                .multipart_upload(done)
                .send()
                .await
        })
        .map(|_| ())
        .map_err(|e| self.error("completing the upload of", what, e))
    }

    /// Aborts the multipart upload `id` of `key`, best effort: the error that led here is
    /// the one to report.
    fn abort_upload(&self, bucket: &str, key: &str, id: &str) {
        let (client, b, k, id) =
            (self.inner.client.clone(), bucket.to_string(), key.to_string(), id.to_string());
        let _ = self.run(async move {
            client.abort_multipart_upload().bucket(b).key(k).upload_id(id).send().await
        });
    }

    /// Every object whose key starts with `prefix` (all pages), in key order.
    pub fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, RuntimeError> {
        let (client, b, p) = (self.inner.client.clone(), bucket.to_string(), prefix.to_string());
        let result = self.run(async move {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = client
                    .list_objects_v2()
                    .bucket(&b)
                    .prefix(&p)
                    .set_continuation_token(token.take())
                    .send()
                    .await?;
                for o in page.contents() {
                    if let Some(key) = o.key() {
                        out.push(ObjectInfo {
                            key: key.to_string(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                            etag: o.e_tag().map(str::to_string),
                        });
                    }
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            Ok::<_, SdkError<_, HttpResponse>>(out)
        });
        let mut out = result.map_err(|e| self.error("listing", &location(bucket, prefix), e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Lists at most one key under `prefix`: fails as a listing would when the bucket does
    /// not exist, the endpoint does not answer or the credentials are refused.
    pub fn check_bucket(&self, bucket: &str, prefix: &str) -> Result<(), RuntimeError> {
        let (client, b, p) = (self.inner.client.clone(), bucket.to_string(), prefix.to_string());
        self.run(
            async move { client.list_objects_v2().bucket(b).prefix(p).max_keys(1).send().await },
        )
        .map(|_| ())
        .map_err(|e| self.error("listing", &location(bucket, prefix), e))
    }

    /// The whole object.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>, RuntimeError> {
        self.get_inner(bucket, key, None, None).map_err(|(e, _)| e)
    }

    /// The object `key`, or `None` when there is no such object.
    pub fn get_opt(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        match self.get_inner(bucket, key, None, None) {
            Ok(b) => Ok(Some(b)),
            Err((_, true)) => Ok(None),
            Err((e, false)) => Err(e),
        }
    }

    /// Bytes `start..=end` of the object (an HTTP range: `end` is inclusive). With `if_match`
    /// (an entity tag from [`S3Client::list`]) the read fails if the object was replaced.
    pub fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<Vec<u8>, RuntimeError> {
        if end < start {
            return Err(RuntimeError::internal(format!(
                "S3 reading {}: empty range {start}-{end}",
                location(bucket, key)
            )));
        }
        self.get_inner(bucket, key, Some(format!("bytes={start}-{end}")), if_match)
            .map_err(|(e, _)| e)
    }

    fn get_inner(
        &self,
        bucket: &str,
        key: &str,
        range: Option<String>,
        if_match: Option<&str>,
    ) -> Result<Vec<u8>, (RuntimeError, bool)> {
        let (client, b, k) = (self.inner.client.clone(), bucket.to_string(), key.to_string());
        let if_match = if_match.map(str::to_string);
        let what = match &range {
            Some(r) => format!("reading {} ({r})", location(bucket, key)),
            None => format!("reading {}", location(bucket, key)),
        };
        let result = self.run(async move {
            let out = client
                .get_object()
                .bucket(b)
                .key(k)
                .set_range(range)
                .set_if_match(if_match)
                .send()
                .await
                .map_err(|e| Fail::Sdk(Box::new(e)))?;
            let bytes = out.body.collect().await.map_err(|e| Fail::Body(e.to_string()))?;
            // One copy, from the received pieces into the vector.
            Ok::<_, Fail<_>>(bytes.to_vec())
        });
        result.map_err(|f| match f {
            Fail::Sdk(e) => {
                let missing =
                    matches!(&*e, SdkError::ServiceError(se) if se.raw().status().as_u16() == 404);
                (self.error("", &what, *e), missing)
            }
            Fail::Body(e) => (
                RuntimeError::external(format!("S3 {what}: the transfer broke: {e}")).retryable(),
                false,
            ),
        })
    }

    /// Writes `bytes` as the object `key`.
    pub fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<(), RuntimeError> {
        let (client, b, k) = (self.inner.client.clone(), bucket.to_string(), key.to_string());
        self.run(async move {
            client.put_object().bucket(b).key(k).body(ByteStream::from(bytes)).send().await
        })
        .map(|_| ())
        .map_err(|e| self.error("writing", &location(bucket, key), e))
    }

    /// Writes the local file `path` as the object `key`, [`UPLOAD_PART`] bytes in memory at a
    /// time: a small file in one PUT, a larger one as a multipart upload (aborted if a part
    /// fails). Every piece is signed with its SHA-256 and carries a checksum header, rather
    /// than being streamed with a trailing checksum, which some S3-compatible servers refuse.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) -> Result<(), RuntimeError> {
        use std::io::Read;
        let what = location(bucket, key);
        let local = |e: std::io::Error| {
            RuntimeError::external(format!(
                "S3 writing {what}: reading the local file {}: {e}",
                path.display()
            ))
        };
        let mut file = std::fs::File::open(path).map_err(local)?;
        let mut next_piece = || -> Result<Vec<u8>, RuntimeError> {
            let mut piece = Vec::with_capacity(UPLOAD_PART);
            (&mut file).take(UPLOAD_PART as u64).read_to_end(&mut piece).map_err(local)?;
            Ok(piece)
        };
        let first = next_piece()?;
        if first.len() < UPLOAD_PART {
            return self.put(bucket, key, first);
        }
        let upload_id = self.start_upload(bucket, key, &what)?;
        let upload = || -> Result<(), RuntimeError> {
            let mut parts = Vec::new();
            let mut piece = first;
            while !piece.is_empty() {
                let n = parts.len() as i32 + 1;
                let (client, b, k, id) = (
                    self.inner.client.clone(),
                    bucket.to_string(),
                    key.to_string(),
                    upload_id.clone(),
                );
                let part = self
                    .run(upload_part(client, b, k, id, n, piece))
                    .map_err(|e| self.error(&format!("writing part {n} of"), &what, e))?;
                parts.push(part);
                piece = next_piece()?;
            }
            self.complete_upload(bucket, key, &upload_id, parts, &what)
        };
        let result = upload();
        if result.is_err() {
            self.abort_upload(bucket, key, &upload_id);
        }
        result
    }

    /// Writes the object `key` from what `write` writes, without a local file: the bytes are
    /// cut into [`UPLOAD_PART`]-byte parts of a multipart upload, and up to
    /// [`PARTS_IN_FLIGHT`] parts go up at the same time while `write` produces the next one
    /// (so at most `PARTS_IN_FLIGHT + 1` parts are in memory). Less than one part is one PUT.
    /// If `write` or an upload fails, the upload is aborted and nothing is written; an upload's
    /// error is reported rather than the write error it caused. Returns the object's size.
    pub fn put_streamed(
        &self,
        bucket: &str,
        key: &str,
        write: &mut dyn FnMut(&mut dyn std::io::Write) -> Result<(), RuntimeError>,
    ) -> Result<u64, RuntimeError> {
        let mut w = PartWriter {
            s3: self,
            bucket,
            key,
            buf: Vec::with_capacity(UPLOAD_PART),
            upload_id: None,
            in_flight: std::collections::VecDeque::new(),
            parts: Vec::new(),
            error: None,
            size: 0,
        };
        let written = write(&mut w);
        let result = match (w.error.take(), written) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => w.finish(),
        };
        if result.is_err() {
            w.abort();
        }
        result
    }

    /// Copies the object `from` to `to` in the same bucket (server-side, up to 5 GiB).
    pub fn copy(&self, bucket: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        let (client, b, t) = (self.inner.client.clone(), bucket.to_string(), to.to_string());
        let source = format!("{bucket}/{}", encode_copy_source(from));
        self.run(
            async move { client.copy_object().bucket(b).key(t).copy_source(source).send().await },
        )
        .map(|_| ())
        .map_err(|e| {
            self.error(
                "copying",
                &format!("{} to {}", location(bucket, from), location(bucket, to)),
                e,
            )
        })
    }

    /// Deletes the object `key` (no error if it is not there).
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), RuntimeError> {
        let (client, b, k) = (self.inner.client.clone(), bucket.to_string(), key.to_string());
        self.run(async move { client.delete_object().bucket(b).key(k).send().await })
            .map(|_| ())
            .map_err(|e| self.error("deleting", &location(bucket, key), e))
    }

    /// Deletes every object under `prefix`, which names a directory and so ends with `/`
    /// (`x/y/` takes `x/y/a` and `x/y/z/b`, never `x/yz`): lists it, then deletes what it
    /// found with DeleteObjects, [`DELETE_BATCH`] keys a request. Returns how many objects it
    /// deleted: 0 when there were none, so deleting again is not an error.
    ///
    /// An empty prefix (the whole bucket) is refused as the user's error; a prefix without
    /// the trailing `/` (which would take the siblings whose names start the same, `sp-1`
    /// and `sp-12`) or with a leading one is refused as the caller's. The first key S3 would
    /// not delete is reported with its code; the objects deleted before it stay deleted, and
    /// calling again goes on. Objects written under the prefix meanwhile may stay.
    pub fn delete_prefix(&self, bucket: &str, prefix: &str) -> Result<u64, RuntimeError> {
        let under = location(bucket, prefix);
        if prefix.trim_matches('/').is_empty() {
            return Err(RuntimeError::user(format!(
                "S3 deleting under {under}: refusing to delete the whole bucket: name a prefix"
            )));
        }
        if !prefix.ends_with('/') || prefix.starts_with('/') {
            return Err(RuntimeError {
                retryable: false,
                ..RuntimeError::internal(format!(
                    "S3 deleting under {under}: not a directory prefix: it must end with `/` and not start with one"
                ))
            });
        }
        let objects = self.list(bucket, prefix)?;
        let mut deleted = 0u64;
        for batch in objects.chunks(DELETE_BATCH) {
            let ids = batch
                .iter()
                .map(|o| ObjectIdentifier::builder().key(&o.key).build())
                .collect::<Result<Vec<_>, _>>()
                .and_then(|ids| Delete::builder().set_objects(Some(ids)).quiet(true).build())
                .map_err(|e| {
                    RuntimeError::internal(format!("S3 deleting under {under}: {}", causes(&e)))
                })?;
            let (client, b) = (self.inner.client.clone(), bucket.to_string());
            let out = self
                .run(async move { client.delete_objects().bucket(b).delete(ids).send().await })
                .map_err(|e| self.error("deleting the objects under", &under, e))?;
            // A key already gone is deleted (S3 says so itself; some servers say NoSuchKey).
            let gone = out.errors().iter().filter(|e| e.code() == Some("NoSuchKey")).count();
            if let Some(e) = out.errors().iter().find(|e| e.code() != Some("NoSuchKey")) {
                let failed = out.errors().len() - gone;
                return Err(self.key_error(bucket, e, (failed, batch.len()), deleted, &under));
            }
            deleted += (batch.len() - gone) as u64;
        }
        Ok(deleted)
    }

    /// The error of a key that DeleteObjects would not delete.
    fn key_error(
        &self,
        bucket: &str,
        e: &aws_sdk_s3::types::Error,
        (failed, sent): (usize, usize),
        deleted: u64,
        under: &str,
    ) -> RuntimeError {
        let code = e.code().unwrap_or("");
        let mut text = format!("S3 deleting {}: ", location(bucket, e.key().unwrap_or("")));
        match (code, e.message().unwrap_or("")) {
            ("", "") => text.push_str("not deleted"),
            (c, "") | ("", c) => text.push_str(c),
            (c, m) => text.push_str(&format!("{c}: {m}")),
        }
        text.push_str(&format!(
            " ({failed} of {sent} objects under {under} not deleted by this request; {deleted} deleted before it)"
        ));
        if let Some(hint) = hint(code, self.inner.explicit_credentials) {
            text.push_str("; ");
            text.push_str(hint);
        }
        let users = matches!(
            code,
            "AccessDenied" | "AllAccessDisabled" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"
        );
        if users { RuntimeError::user(text) } else { RuntimeError::external(text).retryable() }
    }

    /// A runtime error for a failed request: the operation and what it was on, the S3 error
    /// code and message, and who has to act.
    fn error<E>(&self, op: &str, what: &str, err: SdkError<E, HttpResponse>) -> RuntimeError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let what = if op.is_empty() { what.to_string() } else { format!("{op} {what}") };
        match &err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = err.code().unwrap_or("");
                let message = err.message().unwrap_or("");
                let mut text = format!("S3 {what}: ");
                match (code.is_empty(), message.is_empty()) {
                    (false, false) => text.push_str(&format!("{code}: {message}")),
                    (false, true) => text.push_str(code),
                    (true, false) => text.push_str(message),
                    (true, true) => text.push_str("the request failed"),
                }
                text.push_str(&format!(" (HTTP {status})"));
                if let Some(hint) = hint(code, self.inner.explicit_credentials) {
                    text.push_str("; ");
                    text.push_str(hint);
                }
                // A 4xx other than a timeout or throttling is the job's settings; the rest
                // may pass.
                let client_side = (400..500).contains(&status) && status != 408 && status != 429;
                if client_side {
                    RuntimeError::user(text)
                } else {
                    RuntimeError::external(text).retryable()
                }
            }
            SdkError::ConstructionFailure(_) => RuntimeError::user(format!(
                "S3 {what}: the request cannot be built: {}",
                causes(&err)
            )),
            _ => RuntimeError::external(format!(
                "S3 {what}: cannot talk to {}: {}",
                self.inner.endpoint.as_deref().unwrap_or("AWS S3"),
                causes(&err)
            ))
            .retryable(),
        }
    }
}

/// Keys a DeleteObjects request of [`S3Client::delete_prefix`] takes (S3's limit).
pub const DELETE_BATCH: usize = 1000;

/// Parts of a streamed upload ([`S3Client::put_streamed`]) sent at the same time.
pub const PARTS_IN_FLIGHT: usize = 3;

type PartResult = Result<CompletedPart, RuntimeError>;

/// The writer behind [`S3Client::put_streamed`]: fills a part, hands it to the client's
/// runtime, and waits only when [`PARTS_IN_FLIGHT`] parts are already on their way.
struct PartWriter<'a> {
    s3: &'a S3Client,
    bucket: &'a str,
    key: &'a str,
    buf: Vec<u8>,
    upload_id: Option<String>,
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<PartResult>>,
    parts: Vec<CompletedPart>,
    /// The first failure of an upload; writes fail from then on.
    error: Option<RuntimeError>,
    size: u64,
}

impl PartWriter<'_> {
    fn what(&self) -> String {
        location(self.bucket, self.key)
    }

    /// Waits for the oldest part on its way.
    fn wait_oldest(&mut self) -> Result<(), RuntimeError> {
        let Some(h) = self.in_flight.pop_front() else { return Ok(()) };
        let part = block_on(&self.s3.inner.handle, h).unwrap_or_else(|e| {
            Err(RuntimeError::internal(format!(
                "S3 writing {}: a part upload died: {e}",
                self.what()
            )))
        })?;
        self.parts.push(part);
        Ok(())
    }

    /// Sends the filled buffer as the next part (starting the upload first if needed).
    fn send_part(&mut self) -> Result<(), RuntimeError> {
        let inner = &self.s3.inner;
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self.s3.start_upload(self.bucket, self.key, &self.what())?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        let n = (self.parts.len() + self.in_flight.len()) as i32 + 1;
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(UPLOAD_PART));
        let (client, b, k) = (inner.client.clone(), self.bucket.to_string(), self.key.to_string());
        let s3 = self.s3.clone();
        let what = self.what();
        self.in_flight.push_back(inner.handle.spawn(async move {
            upload_part(client, b, k, id, n, piece)
                .await
                .map_err(|e| s3.error(&format!("writing part {n} of"), &what, e))
        }));
        Ok(())
    }

    /// Sends what is left and completes the upload (or PUTs a small object whole).
    fn finish(&mut self) -> Result<u64, RuntimeError> {
        if self.upload_id.is_none() {
            let piece = std::mem::take(&mut self.buf);
            self.s3.put(self.bucket, self.key, piece)?;
            return Ok(self.size);
        }
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        let id = self.upload_id.clone().unwrap_or_default();
        let parts = std::mem::take(&mut self.parts);
        self.s3.complete_upload(self.bucket, self.key, &id, parts, &self.what())?;
        self.upload_id = None;
        Ok(self.size)
    }

    /// Stops the parts on their way and aborts the upload (best effort: the first error is
    /// the one to report).
    fn abort(&mut self) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(id) = self.upload_id.take() {
            self.s3.abort_upload(self.bucket, self.key, &id);
        }
    }
}

impl std::io::Write for PartWriter<'_> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.error {
            return Err(std::io::Error::other(e.message.clone()));
        }
        let n = data.len();
        while !data.is_empty() {
            let take = (UPLOAD_PART - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == UPLOAD_PART
                && let Err(e) = self.send_part()
            {
                let io = std::io::Error::other(e.message.clone());
                self.error = Some(e);
                return Err(io);
            }
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `fut` to completion on the client's runtime, blocking this thread. Called from inside
/// another tokio runtime, it hands the future over and waits, rather than nesting runtimes
/// (which would panic); that blocks the calling worker thread, as any blocking call does.
fn block_on<F>(handle: &tokio::runtime::Handle, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return handle.block_on(fut);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    match rx.recv() {
        Ok(out) => out,
        // The task dropped its sender without sending: the future panicked, and so does this.
        Err(_) => panic!("an S3 request panicked"),
    }
}

/// Why an async request failed.
enum Fail<E> {
    Sdk(Box<E>),
    Body(String),
}

/// An error and its sources, `: `-separated (as `DisplayErrorContext` does, without the
/// debug dump of the whole error that it appends, which can hold response headers).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// What to do about an S3 error code; `explicit`: the client was given its credentials.
fn hint(code: &str, explicit: bool) -> Option<&'static str> {
    match code {
        "NoSuchBucket" => Some("the bucket does not exist: check the bucket name of the path"),
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" if explicit => Some(
            "the credentials are refused: check the access key id and secret access key given (in Kubernetes: the keys of spec.s3.credentialsSecret)",
        ),
        "AccessDenied" if explicit => Some(
            "the credentials are refused or not allowed to do this: check the access key id and secret access key given (in Kubernetes: the keys of spec.s3.credentialsSecret) and the key's permissions",
        ),
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" => Some(
            "the credentials are refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or spec.s3.credentialsSecret)",
        ),
        "AccessDenied" => Some(
            "the credentials are refused or not allowed to do this: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or spec.s3.credentialsSecret) and the key's permissions",
        ),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
            Some("the bucket is in another region: check spec.s3.region or AWS_REGION")
        }
        "PreconditionFailed" => Some("the object was replaced while it was being read"),
        _ => None,
    }
}

fn no_credentials(detail: &str) -> RuntimeError {
    RuntimeError::user(format!(
        "S3: no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (in Kubernetes: spec.s3.credentialsSecret) ({detail})"
    ))
}

/// A key as `x-amz-copy-source` wants it: percent-encoded, except `/`.
fn encode_copy_source(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Whose;

    #[test]
    fn endpoints_lose_their_user_info() {
        assert_eq!(redact_endpoint("http://u:secret@host:9000/x"), "http://host:9000/x");
        assert_eq!(redact_endpoint("https://host"), "https://host");
        assert_eq!(redact_endpoint("host"), "host");
    }

    #[test]
    fn copy_sources_are_percent_encoded() {
        assert_eq!(encode_copy_source("a/b c/ü+x.txt"), "a/b%20c/%C3%BC%2Bx.txt");
    }

    const SECRET: &str = "wJalrXUtnFEMI-test-secret-key";
    const TOKEN: &str = "session-token-test-value";

    fn test_credentials() -> Credentials {
        Credentials { session_token: Some(TOKEN.into()), ..Credentials::new("AKIATEST", SECRET) }
    }

    /// A spec with an endpoint and a region, so that nothing comes from the environment.
    fn test_spec(endpoint: &str) -> S3Spec {
        S3Spec {
            endpoint: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            ..S3Spec::default()
        }
    }

    /// A server on a free port that answers each request with what `answer` returns for its
    /// request line and body: a status and an XML body.
    fn scripted_server(answer: fn(&str, &str) -> (u16, String)) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break req.len(),
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&req[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while req.len() < head_end + len {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = head.lines().next().unwrap_or("").to_string();
                let (status, body) = answer(&line, &String::from_utf8_lossy(&req[head_end..]));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    /// Answers every request with `403 InvalidAccessKeyId`.
    fn refuse(_: &str, _: &str) -> (u16, String) {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error>\
                    <Code>InvalidAccessKeyId</Code><Message>no such key</Message></Error>";
        (403, body.to_string())
    }

    #[test]
    fn credentials_never_show_their_secrets() {
        let text = format!("{:?}", test_credentials());
        assert!(text.contains("AKIATEST"), "{text}");
        assert!(!text.contains(SECRET) && !text.contains(TOKEN), "{text}");
        let client = S3Client::with_credentials(
            Some(&test_spec("http://127.0.0.1:1")),
            Some(test_credentials()),
        )
        .unwrap();
        let text = format!("{client:?}");
        assert!(!text.contains(SECRET) && !text.contains(TOKEN) && !text.contains("AKIATEST"));
    }

    #[test]
    fn empty_explicit_keys_are_refused() {
        let spec = test_spec("http://127.0.0.1:1");
        for c in [Credentials::new("", SECRET), Credentials::new("AKIATEST", " ")] {
            let e = S3Client::with_credentials(Some(&spec), Some(c)).unwrap_err();
            assert_eq!(e.whose, Whose::User, "{e}");
            assert!(e.message.contains("spec.s3.credentialsSecret"), "{e}");
        }
    }

    #[test]
    fn deleting_refuses_the_whole_bucket_and_prefixes_that_are_not_directories() {
        // Refused before any request: nothing listens at the endpoint.
        let client = S3Client::with_credentials(
            Some(&test_spec("http://127.0.0.1:1")),
            Some(test_credentials()),
        )
        .unwrap();
        for prefix in ["", "/", "//"] {
            let e = client.delete_prefix("bucket", prefix).unwrap_err();
            assert_eq!(e.whose, Whose::User, "{e}");
            assert!(e.message.contains("whole bucket"), "{e}");
        }
        for prefix in ["p/a", "/p/a/", "sp-1"] {
            let e = client.delete_prefix("bucket", prefix).unwrap_err();
            assert!(e.whose == Whose::Internal && !e.retryable, "{e:?}");
            assert!(e.message.contains("not a directory prefix"), "{e}");
        }
    }

    /// A listing of `d/a`, `d/b` and `d/c` under `denied/` or `gone/`; DeleteObjects answers
    /// that `d/b` is not deleted (AccessDenied) and `d/c` was not there (NoSuchKey) under
    /// `denied/`, and only the latter under `gone/`.
    fn delete_with_key_errors(line: &str, body: &str) -> (u16, String) {
        const NS: &str = "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"";
        let dir =
            if line.contains("denied") || body.contains("denied/") { "denied" } else { "gone" };
        if line.starts_with("get ") {
            let contents: String = ["a", "b", "c"]
                .iter()
                .map(|k| format!("<Contents><Key>{dir}/d/{k}</Key><Size>1</Size></Contents>"))
                .collect();
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult {NS}>\
                 <Name>bucket</Name><Prefix>{dir}/</Prefix><KeyCount>3</KeyCount>\
                 <MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}\
                 </ListBucketResult>"
            );
            return (200, xml);
        }
        assert!(line.starts_with("post ") && line.contains("delete"), "{line}");
        let mut errors = String::new();
        if dir == "denied" {
            errors.push_str(&format!(
                "<Error><Key>{dir}/d/b</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            ));
        }
        errors.push_str(&format!(
            "<Error><Key>{dir}/d/c</Key><Code>NoSuchKey</Code><Message>gone</Message></Error>"
        ));
        (
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DeleteResult {NS}>{errors}</DeleteResult>"
            ),
        )
    }

    #[test]
    fn deleting_reports_the_first_key_not_deleted_and_counts_keys_already_gone() {
        let endpoint = scripted_server(delete_with_key_errors);
        let client =
            S3Client::with_credentials(Some(&test_spec(&endpoint)), Some(test_credentials()))
                .unwrap();
        let e = client.delete_prefix("bucket", "denied/").unwrap_err();
        assert_eq!(e.whose, Whose::User, "{e}");
        assert!(e.message.contains("s3://bucket/denied/d/b: AccessDenied: Access Denied"), "{e}");
        assert!(e.message.contains("1 of 3 objects under s3://bucket/denied/ not deleted"), "{e}");
        assert!(e.message.contains("spec.s3.credentialsSecret"), "{e}");
        // A key that was already gone is not an error, and not counted.
        assert_eq!(client.delete_prefix("bucket", "gone/").unwrap(), 2);
    }

    /// The controller calls the client from `spawn_blocking` on a multi-threaded runtime: the
    /// client is made, used and dropped there (and its last clone dropped on a worker thread
    /// of that runtime) without nesting runtimes or panicking.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_is_made_used_and_dropped_inside_spawn_blocking() {
        let endpoint = scripted_server(refuse);
        let kept = tokio::task::spawn_blocking(move || {
            let client =
                S3Client::with_credentials(Some(&test_spec(&endpoint)), Some(test_credentials()))
                    .unwrap();
            let e = client.check_bucket("bucket", "prefix/").unwrap_err();
            // A refused key is the user's to fix, with a hint for given credentials.
            assert_eq!(e.whose, Whose::User, "{e}");
            assert!(e.message.contains("InvalidAccessKeyId"), "{e}");
            assert!(e.message.contains("spec.s3.credentialsSecret"), "{e}");
            assert!(!e.message.contains(SECRET), "{e}");
            let kept = client.clone();
            drop(client);
            kept
        })
        .await
        .unwrap();
        // And the last clone goes in an async context, on a worker thread.
        tokio::spawn(async move { drop(kept) }).await.unwrap();
        // One made and dropped without being used.
        tokio::task::spawn_blocking(|| {
            let client = S3Client::with_credentials(
                Some(&test_spec("http://127.0.0.1:1")),
                Some(test_credentials()),
            )
            .unwrap();
            drop(client);
        })
        .await
        .unwrap();
    }
}
