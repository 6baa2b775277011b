//! `StorageUri`: where checkpoints, savepoints and job data live: `s3://bucket/prefix` or a
//! local directory (`/path` or `file:///path`).

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every storage URI must match (bucket names as S3 allows them).
/// An S3 key prefix is a list of `/`-separated segments, none of them `..` (the apiserver's
/// regular expressions have no look-ahead, so the segment rule is spelled out), so that the
/// apiserver refuses every location [`StorageUri::from_str`] refuses and the controller never
/// meets a StreamJob it cannot read.
pub const STORAGE_URI_PATTERN: &str = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/([^\s/.][^\s/]*|\.([^\s/.][^\s/]*)?|\.\.[^\s/]+)?)*|file:///[^\s]*|/[^\s]*)$";

/// A parsed storage location.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StorageUri {
    /// An S3 bucket and a key prefix (without leading or trailing `/`; may be empty).
    S3 { bucket: String, prefix: String },
    /// A local directory (absolute).
    Local(PathBuf),
}

/// Why a storage URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid storage location {input:?}: {reason}; write s3://bucket/prefix or an absolute local path"
)]
pub struct ParseStorageUriError {
    pub input: String,
    pub reason: &'static str,
}

impl StorageUri {
    /// The same location with `segment` appended (a key prefix or a sub-directory).
    pub fn join(&self, segment: &str) -> StorageUri {
        let segment = segment.trim_matches('/');
        match self {
            StorageUri::S3 { bucket, prefix } if prefix.is_empty() => {
                StorageUri::S3 { bucket: bucket.clone(), prefix: segment.to_string() }
            }
            StorageUri::S3 { bucket, prefix } => {
                StorageUri::S3 { bucket: bucket.clone(), prefix: format!("{prefix}/{segment}") }
            }
            StorageUri::Local(p) => StorageUri::Local(p.join(segment)),
        }
    }
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for StorageUri {
    type Err = ParseStorageUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseStorageUriError { input: s.to_string(), reason };
        if s.chars().any(char::is_whitespace) {
            return Err(err("it contains white space"));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(err("the bucket name is missing"));
            }
            if !valid_bucket(bucket) {
                return Err(err(
                    "the bucket name must be 3 to 63 lowercase letters, digits, dots or hyphens, starting and ending with a letter or digit",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|seg| seg == "..") {
                return Err(err("the prefix may not contain `..`"));
            }
            return Ok(StorageUri::S3 { bucket: bucket.into(), prefix: prefix.into() });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err("a file:// location needs an absolute path (file:///dir)"));
            }
            return Ok(StorageUri::Local(path.into()));
        }
        if s.starts_with('/') {
            return Ok(StorageUri::Local(s.into()));
        }
        if s.contains("://") {
            return Err(err("only s3:// and file:// schemes are supported"));
        }
        Err(err("a local path must be absolute"))
    }
}

impl fmt::Display for StorageUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUri::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StorageUri::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StorageUri::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Serialize for StorageUri {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StorageUri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for StorageUri {
    fn schema_name() -> Cow<'static, str> {
        "StorageUri".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": STORAGE_URI_PATTERN })
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_and_local_locations() {
        assert_eq!(
            "s3://my-bucket/a/b/".parse::<StorageUri>().unwrap(),
            StorageUri::S3 { bucket: "my-bucket".into(), prefix: "a/b".into() }
        );
        assert_eq!(
            "s3://bkt".parse::<StorageUri>().unwrap(),
            StorageUri::S3 { bucket: "bkt".into(), prefix: "".into() }
        );
        assert_eq!(
            "/var/tmp/x".parse::<StorageUri>().unwrap(),
            StorageUri::Local("/var/tmp/x".into())
        );
        assert_eq!(
            "file:///data".parse::<StorageUri>().unwrap(),
            StorageUri::Local("/data".into())
        );
        let s3: StorageUri = "s3://bkt/p".parse().unwrap();
        assert_eq!(s3.join("ns/job").to_string(), "s3://bkt/p/ns/job");
        assert_eq!("s3://bkt".parse::<StorageUri>().unwrap().join("/x/").to_string(), "s3://bkt/x");
    }

    #[test]
    fn refuses_malformed_locations_naming_the_problem() {
        for (bad, why) in [
            ("s3://", "bucket name is missing"),
            ("s3://Upper/x", "bucket name must be"),
            ("s3://ab", "bucket name must be"),
            ("s3://-bkt/x", "bucket name must be"),
            ("s3://bkt/../x", "may not contain"),
            ("gs://bkt/x", "only s3:// and file://"),
            ("relative/dir", "must be absolute"),
            ("file://rel", "absolute path"),
            ("/a b", "white space"),
        ] {
            let e = bad.parse::<StorageUri>().unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    /// The apiserver checks the schema's pattern, the controller and the runtime parse: the two
    /// must agree, or a StreamJob the apiserver took could not be read by the controller.
    #[test]
    fn the_schema_pattern_accepts_exactly_what_parses() {
        let re = regex::Regex::new(STORAGE_URI_PATTERN).unwrap();
        for s in [
            "s3://my-bucket/a/b/",
            "s3://bkt",
            "s3://bkt/",
            "s3://bkt/a/./b",
            "s3://bkt/..x/x..",
            "s3://bkt/.hidden",
            "s3://bkt/../x",
            "s3://bkt/a/..",
            "s3://bkt/a/../b",
            "s3://bkt//x",
            "s3://",
            "s3://Upper/x",
            "s3://ab",
            "s3://-bkt/x",
            "gs://bkt/x",
            "relative/dir",
            "file://rel",
            "file:///data",
            "/var/tmp/x",
            "/a b",
            "s3://bkt/a b",
        ] {
            assert_eq!(re.is_match(s), s.parse::<StorageUri>().is_ok(), "{s}");
        }
    }
}
