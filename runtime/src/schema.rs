//! The StreamJob CRD's schema, checked by `weir run` and `weir coordinator` as the apiserver
//! checks it at `kubectl apply`: the same file is refused for the same reasons, in the same
//! words.
//!
//! The schema is the one the CRD serves, generated at run time from the CRD's Rust types
//! ([`weir_crds::crd_values`], what `crdgen` writes to `crds/weir-crds.yaml`), so there is one
//! source of truth and no file to find. [`admit`] does what the apiserver does with a new
//! object, in its order:
//!
//! 1. `apiVersion` and `kind` must name a served version of the CRD (kubectl's words: `no
//!    matches for kind "X" in version "Y"`);
//! 2. fields the schema does not know are refused, as strict field validation (kubectl's
//!    default) refuses them: `unknown field "spec.restartStrategy.dealy"`; free-form objects
//!    (`x-kubernetes-preserve-unknown-fields`: operator parameters, `podTemplate`) keep theirs;
//!    `metadata` may hold the fields of an ObjectMeta. They are taken out (pruned), so that
//!    the steps below see what the apiserver's see;
//! 3. a `null` where the schema does not allow one is dropped (its default applies), and
//!    `status` is dropped (a create cannot set it);
//! 4. what is left is validated against the OpenAPI v3 schema as the apiserver's validator
//!    (kube-openapi) does, each error in the apiserver's words, naming the field: `spec.
//!    checkpointing.retained: Invalid value: 0: spec.checkpointing.retained in body should be
//!    greater than or equal to 1`, `spec.upgradeMode: Unsupported value: "yolo": supported
//!    values: "savepoint", "last-state", "stateless"`, `spec.pipeline: Required value`, `... in
//!    body should match '^...$'`, `Too long: may not be more than 63 bytes`, ...
//!
//! Every error is reported, not only the first. The CEL rules of the CRD
//! (`x-kubernetes-validations`) are not evaluated here: [`weir_crds::StreamJobSpec::validate`]
//! checks them, with the same messages, where the runtime builds its plan.
//!
//! The schema's `pattern`s are Go regular expressions (RE2); [`Pattern`] matches the part of
//! that syntax the schema uses, with Go's meaning (`\s` is ASCII whitespace), in time linear in
//! the input. A unit test holds every keyword, format and pattern of the schema to what this
//! module implements.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};
use weir_crds::StreamJob;

// ---------------------------------------------------------------------------------------------
// The CRD

/// What the apiserver takes from a CRD to admit an object: its group and kind, and the schema
/// of each served version.
#[derive(Debug, Clone, PartialEq)]
pub struct Crd {
    pub group: String,
    pub kind: String,
    /// The served versions (`v1alpha1`), each with its `openAPIV3Schema`.
    pub versions: Vec<(String, Value)>,
}

impl Crd {
    /// The StreamJob CRD, generated from the CRD types once.
    pub fn stream_job() -> &'static Crd {
        static CRD: OnceLock<Crd> = OnceLock::new();
        CRD.get_or_init(|| {
            weir_crds::crd_values()
                .iter()
                .filter_map(Crd::from_value)
                .find(|c| c.kind == "StreamJob")
                .expect("the StreamJob CRD has a group, a kind and a served version")
        })
    }

    /// Reads a CustomResourceDefinition (as JSON).
    pub fn from_value(crd: &Value) -> Option<Crd> {
        let spec = crd.get("spec")?;
        let group = spec.get("group")?.as_str()?.to_string();
        let kind = spec.pointer("/names/kind")?.as_str()?.to_string();
        let versions: Vec<(String, Value)> = spec
            .get("versions")?
            .as_array()?
            .iter()
            .filter(|v| v.get("served").and_then(Value::as_bool) == Some(true))
            .filter_map(|v| {
                let name = v.get("name")?.as_str()?.to_string();
                let schema = v.pointer("/schema/openAPIV3Schema")?.clone();
                Some((name, schema))
            })
            .collect();
        (!versions.is_empty()).then_some(Crd { group, kind, versions })
    }

    /// The `apiVersion`s it serves (`weir.dev/v1alpha1`).
    pub fn api_versions(&self) -> Vec<String> {
        self.versions.iter().map(|(v, _)| format!("{}/{v}", self.group)).collect()
    }

    /// The schema of the served version that `api_version` names.
    pub fn schema(&self, api_version: &str) -> Option<&Value> {
        let version = api_version.strip_prefix(&self.group)?.strip_prefix('/')?;
        self.versions.iter().find(|(v, _)| v == version).map(|(_, s)| s)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One error, as the apiserver words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a path from the object's root: `spec.pipeline.operators[0].uid`.
    pub field: String,
    /// The whole message: `spec.pipeline.operators[0].uid: Invalid value: "A": ...`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a manifest is refused before anything else is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The document is not a mapping.
    NotAnObject { found: &'static str },
    /// `apiVersion` or `kind` is missing, not a string, or names no served version of the
    /// CRD: the message says which, in kubectl's words, and what is served.
    TypeMeta(String),
    /// The object does not pass the schema: every error.
    Invalid { kind: String, name: Option<String>, errors: Vec<FieldError> },
}

/// At most this many errors are listed; the rest are counted.
const MAX_LISTED: usize = 25;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NotAnObject { found } => {
                write!(f, "not a StreamJob manifest: the document is {found}, not a mapping")
            }
            Refused::TypeMeta(m) => f.write_str(m),
            Refused::Invalid { kind, name, errors } => {
                // kubectl's form: `The StreamJob "wc" is invalid: <error>`, or one `* <error>`
                // line each.
                match name {
                    Some(n) => write!(f, "The {kind} {} is invalid:", go_quote(n))?,
                    None => write!(f, "The {kind} is invalid:")?,
                }
                if let [one] = errors.as_slice() {
                    return write!(f, " {one}");
                }
                for e in errors.iter().take(MAX_LISTED) {
                    write!(f, "\n* {e}")?;
                }
                if errors.len() > MAX_LISTED {
                    write!(f, "\n* ... and {} more", errors.len() - MAX_LISTED)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Refused {}

// ---------------------------------------------------------------------------------------------
// Admission

/// Checks a StreamJob manifest (parsed from YAML) as the apiserver checks it at create, and
/// leaves in `object` what the apiserver would go on with: nulls it drops dropped, `status`
/// dropped, whole floats as integers (as kubectl sends them). `Ok` means the schema takes it;
/// the CEL rules are [`weir_crds::StreamJobSpec::validate`]'s.
pub fn admit(object: &mut Value) -> Result<(), Refused> {
    admit_to(Crd::stream_job(), object)
}

/// [`admit`] against any CRD.
pub fn admit_to(crd: &Crd, object: &mut Value) -> Result<(), Refused> {
    let Some(root) = object.as_object() else {
        return Err(Refused::NotAnObject { found: json_type(object) });
    };
    let schema = type_meta(crd, root).map_err(Refused::TypeMeta)?;
    let errors = validate(schema, object);
    if errors.is_empty() {
        return Ok(());
    }
    let name = object.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string);
    Err(Refused::Invalid { kind: crd.kind.clone(), name, errors })
}

/// The schema for the object's `apiVersion` and `kind`, or why there is none.
fn type_meta<'c>(crd: &'c Crd, root: &Map<String, Value>) -> Result<&'c Value, String> {
    let served = || {
        let versions = crd.api_versions().join(", ");
        format!("weir runs kind: {}, apiVersion: {versions}", crd.kind)
    };
    let mut missing = Vec::new();
    let mut field = |name: &str| match root.get(name) {
        None | Some(Value::Null) => {
            missing.push(format!("{name} not set"));
            Ok(None)
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // The apiserver's words for a TypeMeta field of another type.
        Some(other) => Err(format!("{name}: Invalid value: {}: must be a string", go_value(other))),
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        // kubectl's words: `error validating data: [apiVersion not set, kind not set]`.
        return Err(format!("{}: {}", missing.join(", "), served()));
    };
    match crd.schema(&api_version) {
        Some(schema) if kind == crd.kind => Ok(schema),
        _ => Err(format!(
            "no matches for kind {} in version {}: {}",
            go_quote(&kind),
            go_quote(&api_version),
            served()
        )),
    }
}

/// Checks `object`, a custom resource, against `schema`, its version's `openAPIV3Schema`, as
/// the apiserver does at create with strict field validation, and leaves it as the apiserver
/// would go on with it (the defaults of absent fields are left to the types, whose defaults
/// the schema's are): every error, the unknown fields first.
pub fn validate(schema: &Value, object: &mut Value) -> Vec<FieldError> {
    // kubectl sends YAML as JSON, where a whole float (`2.0`) is an integer.
    integers(object);
    let mut errors: Vec<FieldError> = Vec::new();
    // The metadata's fields it does not know (the apiserver reads it as an ObjectMeta), then
    // the others, sorted.
    let mut unknown = Vec::new();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let known = object_meta_fields();
        meta.retain(|k, _| {
            let ok = known.contains(&k.as_str());
            if !ok {
                unknown.push(child("metadata", k));
            }
            ok
        });
        unknown.sort();
    }
    let mut pruned = Vec::new();
    prune(Some(schema), object, &mut String::new(), true, &mut pruned);
    pruned.sort();
    unknown.extend(pruned);
    errors.extend(
        unknown.into_iter().map(|field| FieldError {
            message: format!("unknown field {}", go_quote(&field)),
            field,
        }),
    );
    // What is left is validated as the apiserver validates an object pruned without strict
    // field validation.
    drop_nulls(Some(schema), object);
    // A create cannot set the status subresource: the apiserver drops it before it validates.
    if let Some(root) = object.as_object_mut() {
        root.remove("status");
    }
    let mut v = Validator { errors, patterns: HashMap::new() };
    v.value(schema, object, "");
    v.errors
}

/// The fields of the object's `metadata` (an ObjectMeta), by asking its deserializer which it
/// takes.
fn object_meta_fields() -> &'static [&'static str] {
    fn fields_of<T: DeserializeOwned>(_: fn(&StreamJob) -> &T) -> &'static [&'static str] {
        T::deserialize(FieldNames).err().map(|e| e.0).unwrap_or_default()
    }
    static FIELDS: OnceLock<&'static [&'static str]> = OnceLock::new();
    FIELDS.get_or_init(|| fields_of(|j: &StreamJob| &j.metadata))
}

/// A deserializer that only learns the field names of the struct asked for.
struct FieldNames;

#[derive(Debug)]
struct Named(&'static [&'static str]);

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fields {:?}", self.0)
    }
}
impl std::error::Error for Named {}
impl de::Error for Named {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Named(&[])
    }
}

impl<'de> Deserializer<'de> for FieldNames {
    type Error = Named;
    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Named> {
        Err(Named(&[]))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Named> {
        Err(Named(fields))
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Whole floats that JSON writes as integers become integers (`2.0` is `2`), as the apiserver
/// reads what kubectl sends.
fn integers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9_223_372_036_854_775_808.0 {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integers),
        Value::Object(map) => map.values_mut().for_each(integers),
        _ => {}
    }
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn child(path: &str, key: &str) -> String {
    let mut p = path.to_string();
    push_key(&mut p, key);
    p
}

/// The object's own fields at a resource's root, which its schema need not declare.
const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn preserves_unknown(s: &Value) -> bool {
    s.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true)
}

fn property<'s>(s: &'s Value, key: &str) -> Option<&'s Value> {
    s.get("properties").and_then(|p| p.get(key))
}

/// The schema of the values of a map, if the schema has one (`additionalProperties: {...}`),
/// as `Some(None)` for `additionalProperties: true`.
fn additional(s: &Value) -> Option<Option<&Value>> {
    match s.get("additionalProperties")? {
        Value::Bool(true) => Some(None),
        Value::Object(_) => Some(s.get("additionalProperties")),
        _ => None,
    }
}

/// Removes the fields the schema does not know, as the apiserver's pruning does, and
/// records their paths.
fn prune(s: Option<&Value>, v: &mut Value, path: &mut String, root: bool, out: &mut Vec<String>) {
    let keep = s.is_some_and(preserves_unknown);
    let len = path.len();
    match v {
        Value::Object(map) => {
            map.retain(|k, x| {
                if root && META_FIELDS.contains(&k.as_str()) {
                    return true;
                }
                match s.and_then(|s| property(s, k).map(Some).or_else(|| additional(s))) {
                    Some(sub) => {
                        push_key(path, k);
                        prune(sub, x, path, false, out);
                        path.truncate(len);
                        true
                    }
                    None if keep => true,
                    None => {
                        out.push(child(path, k));
                        false
                    }
                }
            });
        }
        Value::Array(items) => {
            let mut item = s.and_then(|s| s.get("items")).map(std::borrow::Cow::Borrowed);
            // In a list that keeps unknown fields, so do its items.
            if keep {
                let Some(it) = item.as_mut() else { return };
                if !preserves_unknown(it) {
                    it.to_mut()["x-kubernetes-preserve-unknown-fields"] = Value::Bool(true);
                }
            }
            for (i, x) in items.iter_mut().enumerate() {
                write!(path, "[{i}]").expect("a String takes writes");
                prune(item.as_deref(), x, path, false, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// A `null` in a map where the schema allows none: the apiserver sets the default, or drops
/// the field when there is none.
fn drop_nulls(s: Option<&Value>, v: &mut Value) {
    match v {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let sub = s.and_then(|s| property(s, &k).or_else(|| additional(s).flatten()));
                let x = map.get_mut(&k).expect("a key of the map");
                match sub {
                    Some(sub) if x.is_null() && !nullable(sub) => match sub.get("default") {
                        Some(d) => *x = d.clone(),
                        None => {
                            map.remove(&k);
                        }
                    },
                    _ => drop_nulls(sub, x),
                }
            }
        }
        Value::Array(items) => {
            let item = s.and_then(|s| s.get("items"));
            items.iter_mut().for_each(|x| drop_nulls(item, x));
        }
        _ => {}
    }
}

fn nullable(s: &Value) -> bool {
    s.get("nullable").and_then(Value::as_bool) == Some(true)
}

// ---------------------------------------------------------------------------------------------
// Validation, as kube-openapi's SchemaValidator does it

/// A JSON number as the apiserver holds it: an int64, or a float64.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(n: &serde_json::Number) -> Num {
        match n.as_i64() {
            Some(i) => Num::Int(i),
            None => Num::Float(n.as_f64().unwrap_or(f64::NAN)),
        }
    }
}

/// The JSON type of a value and the Go format it decodes into (kube-openapi's
/// `schemaInfoForType`).
fn go_type(v: &Value) -> (&'static str, &'static str) {
    match v {
        Value::Null => ("null", ""),
        Value::Bool(_) => ("boolean", ""),
        Value::Number(n) => match Num::of(n) {
            Num::Int(_) => ("integer", "int64"),
            Num::Float(_) => ("number", "float64"),
        },
        Value::String(_) => ("string", ""),
        Value::Array(_) => ("array", ""),
        Value::Object(_) => ("object", ""),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Go's `swag.IsFloat64AJSONInteger`: a float64 close enough to a whole number within 2^53.
fn is_json_integer(f: f64) -> bool {
    const MAX: f64 = 9_007_199_254_740_992.0;
    const EPSILON: f64 = 1e-9;
    if !f.is_finite() || !(-MAX..=MAX).contains(&f) {
        return false;
    }
    let g = (f as u64) as f64;
    let (fa, ga, diff) = (f.abs(), g.abs(), (f - g).abs());
    if f == g || f == (f as i64) as f64 {
        true
    } else if fa <= 1.0 && ga <= 1.0 {
        diff < EPSILON
    } else {
        diff / (fa + ga).min(f64::MAX) < EPSILON
    }
}

struct Validator<'s> {
    errors: Vec<FieldError>,
    patterns: HashMap<&'s str, Result<Pattern, String>>,
}

impl<'s> Validator<'s> {
    fn error(&mut self, field: &str, message: String) {
        self.errors.push(FieldError { field: field.to_string(), message });
    }

    /// `field.Invalid(path, value, detail)`.
    fn invalid(&mut self, path: &str, value: &str, detail: String) {
        self.error(path, format!("{path}: Invalid value: {value}: {detail}"));
    }

    /// One value against its schema: the type, then what applies to the value's kind (to a
    /// null, only the enum).
    fn value(&mut self, s: &'s Value, v: &Value, path: &str) {
        self.check_type(s, v, path);
        match v {
            Value::String(text) => self.check_string(s, text, path),
            Value::Number(n) => self.check_number(s, Num::of(n), path),
            Value::Array(items) => self.check_array(s, items, path),
            _ => {}
        }
        self.check_enum(s, v, path);
        if let Value::Object(map) = v {
            self.check_object(s, map, path);
        }
    }

    fn check_type(&mut self, s: &Value, v: &Value, path: &str) {
        let types: Vec<&str> =
            if s.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
                vec!["integer", "string"]
            } else {
                s.get("type").and_then(Value::as_str).into_iter().collect()
            };
        let format = s.get("format").and_then(Value::as_str).unwrap_or("");
        if types.is_empty() && format.is_empty() {
            return;
        }
        // The message names the type it wants and the value's: `spec.parallelism in body must
        // be of type integer: "string"`; the bad value the field error shows is the latter.
        let wrong = |this: &mut Self, want: &str, got: &str| {
            let got = go_quote(got);
            this.invalid(path, &got, format!("{path} in body must be of type {want}: {got}"));
        };
        if v.is_null() {
            if !types.is_empty() && !types.contains(&"null") && !nullable(s) {
                wrong(self, &types.join(","), "null");
            }
            return;
        }
        let (kind, got_format) = go_type(v);
        let float_int = match v {
            Value::Number(n) => match Num::of(n) {
                Num::Float(f) => is_json_integer(f) && types.contains(&"integer"),
                Num::Int(_) => false,
            },
            _ => false,
        };
        let int_float = kind == "integer" && types.contains(&"number");
        let string_or_array = v.is_string() || v.is_array();
        // A value of another kind than a string or a list must be of the type, or of the
        // format (kube-openapi's typeValidator, condition for condition).
        let of_type_or_format =
            types.contains(&kind) || got_format == format || float_int || int_float;
        if !(string_or_array || format.is_empty() || of_type_or_format) {
            return wrong(self, format, got_format);
        }
        let numeric = types.contains(&"number") || types.contains(&"integer");
        if !numeric && !format.is_empty() && string_or_array {
            return;
        }
        if !(types.contains(&kind) || float_int || int_float) {
            wrong(self, &types.join(","), kind);
        }
    }

    fn check_string(&mut self, s: &'s Value, text: &str, path: &str) {
        let chars = text.chars().count() as u64;
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
            && chars > max
        {
            let unit = if max == 1 { "byte" } else { "bytes" };
            return self
                .error(path, format!("{path}: Too long: may not be more than {max} {unit}"));
        }
        if let Some(min) = s.get("minLength").and_then(Value::as_u64)
            && chars < min
        {
            let detail = format!("{path} in body should be at least {min} chars long");
            return self.invalid(path, &go_quote(text), detail);
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            let outcome =
                match self.patterns.entry(pattern).or_insert_with(|| Pattern::new(pattern)) {
                    Ok(p) => Ok(p.is_match(text)),
                    Err(e) => Err(e.clone()),
                };
            match outcome {
                Ok(true) => {}
                Ok(false) => {
                    let detail = format!("{path} in body should match '{pattern}'");
                    self.invalid(path, &go_quote(text), detail);
                }
                Err(e) => {
                    let message = format!(
                        "{path}: Internal error: the schema's pattern '{pattern}' is beyond weir's matcher: {e}"
                    );
                    self.error(path, message);
                }
            }
        }
    }

    fn check_number(&mut self, s: &Value, n: Num, path: &str) {
        let single = s.get("type").and_then(Value::as_str);
        let format = s.get("format").and_then(Value::as_str).unwrap_or("");
        // The value within the range of its format (kube-openapi's IsValueValidAgainstRange),
        // an error the apiserver reports without a field.
        let in_range = match (single, format, n) {
            (Some("integer"), "int32", Num::Int(i)) => i32::try_from(i).is_ok(),
            (Some("integer"), "int32" | "int64", Num::Float(_)) => false,
            (Some("number"), "float", Num::Float(f)) => f.abs() <= f32::MAX as f64,
            _ => true,
        };
        if !in_range {
            let (t, fmt) = (single.unwrap_or_default(), format);
            self.error(
                path,
                format!(
                    "<nil>: Invalid value: \"\": Checked value must be of type {t} with format {fmt} in {path}"
                ),
            );
        }
        // An int64 is compared with the bound as an int64, a float64 as a float64
        // (kube-openapi's MinimumNativeType, MaximumNativeType); each is written as Go writes
        // it, the minimum before the maximum.
        let bounds = [
            ("minimum", "exclusiveMinimum", Ordering::Less, "greater than"),
            ("maximum", "exclusiveMaximum", Ordering::Greater, "less than"),
        ];
        for (key, exclusive_key, beyond, than) in bounds {
            let Some(bound) = s.get(key).and_then(Value::as_f64) else { continue };
            let exclusive = s.get(exclusive_key).and_then(Value::as_bool) == Some(true);
            let (order, shown) = match n {
                Num::Int(i) => (i.cmp(&(bound as i64)), (bound as i64).to_string()),
                Num::Float(f) => {
                    (f.partial_cmp(&bound).unwrap_or(Ordering::Equal), go_float(bound))
                }
            };
            if order == beyond || (exclusive && order == Ordering::Equal) {
                let or_equal = if exclusive { "" } else { " or equal to" };
                let detail = format!("{path} in body should be {than}{or_equal} {shown}");
                self.invalid(path, &go_num(n), detail);
            }
        }
    }

    fn check_array(&mut self, s: &'s Value, items: &[Value], path: &str) {
        if let Some(item) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                self.value(item, x, &format!("{path}[{i}]"));
            }
        }
        let size = items.len() as u64;
        if let Some(min) = s.get("minItems").and_then(Value::as_u64)
            && size < min
        {
            let detail = format!("{path} in body should have at least {min} items");
            self.invalid(path, &size.to_string(), detail);
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
            && size > max
        {
            let unit = if max == 1 { "item" } else { "items" };
            let message = format!("{path}: Too many: {size}: must have at most {max} {unit}");
            self.error(path, message);
        }
    }

    fn check_enum(&mut self, s: &Value, v: &Value, path: &str) {
        let Some(values) = s.get("enum").and_then(Value::as_array) else { return };
        if values.is_empty() || values.iter().any(|e| same(e, v)) {
            return;
        }
        let supported: Vec<String> = values
            .iter()
            .map(|e| match e {
                Value::String(s) => go_quote(s),
                other => go_quote(&other.to_string()),
            })
            .collect();
        let message = format!(
            "{path}: Unsupported value: {}: supported values: {}",
            go_value(v),
            supported.join(", ")
        );
        self.error(path, message);
    }

    fn check_object(&mut self, s: &'s Value, map: &Map<String, Value>, path: &str) {
        let properties = s.get("properties").and_then(Value::as_object);
        if let Some(Some(values)) = additional(s) {
            for (k, x) in map {
                if properties.is_none_or(|p| !p.contains_key(k)) {
                    self.value(values, x, &child(path, k));
                }
            }
        }
        if let Some(properties) = properties {
            for (k, sub) in properties {
                if let Some(x) = map.get(k) {
                    self.value(sub, x, &child(path, k));
                }
            }
        }
        let required = s.get("required").and_then(Value::as_array).into_iter().flatten();
        for k in required.filter_map(Value::as_str) {
            if !map.contains_key(k) {
                let field = child(path, k);
                self.error(&field, format!("{field}: Required value"));
            }
        }
    }
}

/// Whether a value is an enum's value (numbers by value).
fn same(enum_value: &Value, v: &Value) -> bool {
    match (enum_value, v) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Values as Go prints them

/// A bad value as the apiserver's field errors show it: strings quoted, numbers and booleans
/// as they are, anything else as JSON.
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_num(Num::of(n)),
        Value::String(s) => go_quote(s),
        other => other.to_string(),
    }
}

fn go_num(n: Num) -> String {
    match n {
        Num::Int(i) => i.to_string(),
        Num::Float(f) => go_float(f),
    }
}

/// Go's `%v` of a float64: the shortest digits, with an exponent from 1e+06 up and below
/// 1e-04.
fn go_float(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let sign = if mantissa.starts_with('-') { "-" } else { "" };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..6).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{sign}{digits}{}", "0".repeat(int_len - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// Go's `%q` of a string.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if go_printable(c) => out.push(c),
            c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32).expect("String"),
            c if (c as u32) <= 0xffff => write!(out, "\\u{:04x}", c as u32).expect("String"),
            c => write!(out, "\\U{:08x}", c as u32).expect("String"),
        }
    }
    out.push('"');
    out
}

/// Go's `strconv.IsPrint`, near enough: no controls, no space but ' ', no invisible format
/// characters.
fn go_printable(c: char) -> bool {
    !(c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}'))
}

// ---------------------------------------------------------------------------------------------
// Patterns

/// A regular expression in Go's syntax (RE2), as far as CRD schemas use it: literals and
/// escapes, `.`, classes (`[a-z0-9_-]`, `[^\s/]`, `\s \d \w` and their negations), groups
/// (`(...)`, `(?:...)`), alternation, the repetitions `* + ? {n} {n,} {n,m}`, and the anchors
/// `^ $` (of the whole text: no multi-line mode). Anything else is refused when it is built.
/// [`Pattern::is_match`] searches the text as Go's `MatchString` does, simulating the
/// automaton: time linear in the text, no backtracking.
#[derive(Debug, Clone)]
pub struct Pattern {
    program: Vec<Inst>,
}

#[derive(Debug, Clone)]
enum Inst {
    /// One character of the class.
    Class(Class),
    /// Go on at both.
    Split(usize, usize),
    Jump(usize),
    /// At the start of the text.
    Start,
    /// At the end of the text.
    End,
    Match,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    ranges: Vec<(char, char)>,
    negated: bool,
}

impl Class {
    fn of(c: char) -> Class {
        Class { ranges: vec![(c, c)], negated: false }
    }
    fn matches(&self, c: char) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= c && c <= b) != self.negated
    }
}

#[derive(Debug, Clone)]
enum Node {
    Class(Class),
    Start,
    End,
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, u32, Option<u32>),
}

/// Go's limit on a counted repetition.
const MAX_REPEAT: u32 = 1000;

impl Pattern {
    /// Parses `pattern`, or says what in it is beyond this matcher (or not Go syntax).
    pub fn new(pattern: &str) -> Result<Pattern, String> {
        let mut p = Parser { chars: pattern.chars().collect(), pos: 0 };
        let node = p.alternation()?;
        if p.pos < p.chars.len() {
            return Err(format!("unexpected {:?} at {}", p.chars[p.pos], p.pos));
        }
        let mut program = Vec::new();
        compile(&node, &mut program);
        program.push(Inst::Match);
        Ok(Pattern { program })
    }

    /// Whether the pattern matches somewhere in `text` (Go's `MatchString`).
    pub fn is_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let n = chars.len();
        let mut seen = vec![usize::MAX; self.program.len()];
        let mut pending: Vec<usize> = Vec::new();
        let mut threads: Vec<usize> = Vec::new();
        for i in 0..=n {
            threads.clear();
            // The threads that got here, and one starting here (a search, not anchored).
            pending.push(0);
            let mut stack = std::mem::take(&mut pending);
            while let Some(pc) = stack.pop() {
                if seen[pc] == i {
                    continue;
                }
                seen[pc] = i;
                match &self.program[pc] {
                    Inst::Class(_) => threads.push(pc),
                    Inst::Split(a, b) => {
                        stack.push(*b);
                        stack.push(*a);
                    }
                    Inst::Jump(t) => stack.push(*t),
                    Inst::Start if i == 0 => stack.push(pc + 1),
                    Inst::End if i == n => stack.push(pc + 1),
                    Inst::Start | Inst::End => {}
                    Inst::Match => return true,
                }
            }
            pending = stack;
            let Some(&c) = chars.get(i) else { break };
            for &pc in &threads {
                if let Inst::Class(class) = &self.program[pc]
                    && class.matches(c)
                {
                    pending.push(pc + 1);
                }
            }
        }
        false
    }
}

fn compile(node: &Node, out: &mut Vec<Inst>) {
    match node {
        Node::Class(c) => out.push(Inst::Class(c.clone())),
        Node::Start => out.push(Inst::Start),
        Node::End => out.push(Inst::End),
        Node::Concat(nodes) => nodes.iter().for_each(|n| compile(n, out)),
        Node::Alt(nodes) => {
            // split L1, next; L1: a; jump end; next: split L2, ... ; last
            let mut jumps = Vec::new();
            for (i, n) in nodes.iter().enumerate() {
                if i + 1 < nodes.len() {
                    let split = out.len();
                    out.push(Inst::Split(split + 1, 0));
                    compile(n, out);
                    jumps.push(out.len());
                    out.push(Inst::Jump(0));
                    let next = out.len();
                    out[split] = Inst::Split(split + 1, next);
                } else {
                    compile(n, out);
                }
            }
            let end = out.len();
            for j in jumps {
                out[j] = Inst::Jump(end);
            }
        }
        Node::Repeat(n, min, max) => {
            for _ in 0..*min {
                compile(n, out);
            }
            match max {
                None => {
                    let split = out.len();
                    out.push(Inst::Split(split + 1, 0));
                    compile(n, out);
                    out.push(Inst::Jump(split));
                    let end = out.len();
                    out[split] = Inst::Split(split + 1, end);
                }
                Some(max) => {
                    let mut splits = Vec::new();
                    for _ in *min..*max {
                        splits.push(out.len());
                        out.push(Inst::Split(0, 0));
                        compile(n, out);
                    }
                    let end = out.len();
                    for s in splits {
                        out[s] = Inst::Split(s + 1, end);
                    }
                }
            }
        }
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<char, String> {
        let c = self.peek().ok_or("the pattern ends too early")?;
        self.pos += 1;
        Ok(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn alternation(&mut self) -> Result<Node, String> {
        let mut alts = vec![self.concatenation()?];
        while self.eat('|') {
            alts.push(self.concatenation()?);
        }
        Ok(if alts.len() == 1 { alts.remove(0) } else { Node::Alt(alts) })
    }

    fn concatenation(&mut self) -> Result<Node, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.repetitions(atom)?);
        }
        Ok(Node::Concat(items))
    }

    fn repetitions(&mut self, atom: Node) -> Result<Node, String> {
        let (min, max) = match self.peek() {
            Some('{') => match self.counted()? {
                Some(bounds) => bounds,
                None => return Ok(atom),
            },
            Some(c @ ('*' | '+' | '?')) => {
                self.pos += 1;
                match c {
                    '*' => (0, None),
                    '+' => (1, None),
                    _ => (0, Some(1)),
                }
            }
            _ => return Ok(atom),
        };
        // A lazy repetition matches the same texts.
        self.eat('?');
        if matches!(self.peek(), Some('*' | '+' | '?')) {
            return Err("invalid nested repetition operator".into());
        }
        if matches!(atom, Node::Start | Node::End) {
            return Err("a repeated anchor".into());
        }
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    /// `{n}`, `{n,}` or `{n,m}` (consumed), or `None` for a `{` that is a literal in Go.
    fn counted(&mut self) -> Result<Option<(u32, Option<u32>)>, String> {
        let start = self.pos;
        let rest: String = self.chars[start..].iter().collect();
        let Some(close) = rest.find('}') else { return Ok(None) };
        let inner = &rest[1..close];
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>().ok())
        };
        let bounds = match inner.split_once(',') {
            None => number(inner).map(|n| n.map(|n| (n, Some(n)))),
            Some((a, "")) => number(a).map(|n| n.map(|n| (n, None))),
            Some((a, b)) => match (number(a), number(b)) {
                (Some(a), Some(b)) => Some(a.zip(b).map(|(a, b)| (a, Some(b)))),
                _ => None,
            },
        };
        let Some(bounds) = bounds else { return Ok(None) };
        let (min, max) = bounds.ok_or("a repetition count is too large")?;
        if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
            return Err(format!("invalid repeat count {{{inner}}}"));
        }
        self.pos = start + rest[..=close].chars().count();
        Ok(Some((min, max)))
    }

    fn atom(&mut self) -> Result<Node, String> {
        let c = self.next()?;
        Ok(match c {
            '(' => {
                if self.eat('?') && !self.eat(':') {
                    return Err("flags and named groups are beyond this matcher".into());
                }
                let inner = self.alternation()?;
                if !self.eat(')') {
                    return Err("missing closing )".into());
                }
                inner
            }
            '[' => Node::Class(self.class()?),
            '.' => Node::Class(Class { ranges: vec![('\n', '\n')], negated: true }),
            '^' => Node::Start,
            '$' => Node::End,
            '\\' => Node::Class(self.escape(false)?),
            '*' | '+' | '?' => return Err(format!("missing argument to repetition operator {c}")),
            ')' => return Err("unexpected )".into()),
            c => Node::Class(Class::of(c)),
        })
    }

    /// After a `\`: a Perl class or a character (`in_class`: within `[...]`).
    fn escape(&mut self, in_class: bool) -> Result<Class, String> {
        let c = self.next()?;
        let perl = |ranges: &[(char, char)], negated| Class { ranges: ranges.to_vec(), negated };
        const DIGIT: &[(char, char)] = &[('0', '9')];
        const SPACE: &[(char, char)] = &[('\t', '\n'), ('\u{c}', '\r'), (' ', ' ')];
        const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];
        Ok(match c {
            'd' => perl(DIGIT, false),
            'D' => perl(DIGIT, true),
            's' => perl(SPACE, false),
            'S' => perl(SPACE, true),
            'w' => perl(WORD, false),
            'W' => perl(WORD, true),
            't' => Class::of('\t'),
            'n' => Class::of('\n'),
            'r' => Class::of('\r'),
            'f' => Class::of('\u{c}'),
            'v' => Class::of('\u{b}'),
            'a' => Class::of('\u{7}'),
            c if c.is_ascii_punctuation() => Class::of(c),
            c => {
                let within = if in_class { " in a class" } else { "" };
                return Err(format!("the escape \\{c}{within} is beyond this matcher"));
            }
        })
    }

    /// After a `[`: the class, up to its `]`.
    fn class(&mut self) -> Result<Class, String> {
        let negated = self.eat('^');
        let mut ranges: Vec<(char, char)> = Vec::new();
        let mut first = true;
        loop {
            let c = self.next().map_err(|_| "missing closing ]".to_string())?;
            match c {
                ']' if !first => break,
                '[' if self.peek() == Some(':') => {
                    return Err("[:class:] is beyond this matcher".into());
                }
                '\\' => {
                    let class = self.escape(true)?;
                    if class.negated {
                        ranges.extend(complement(&class.ranges));
                    } else if let [(a, b)] = class.ranges.as_slice()
                        && a == b
                    {
                        let lo = *a;
                        ranges.push(self.range_from(lo)?);
                    } else {
                        ranges.extend(class.ranges);
                    }
                }
                c => ranges.push(self.range_from(c)?),
            }
            first = false;
        }
        Ok(Class { ranges, negated })
    }

    /// `lo`, or `lo-hi` when a `-` and a character other than `]` follow.
    fn range_from(&mut self, lo: char) -> Result<(char, char), String> {
        if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&c| c != ']') {
            self.pos += 1;
            let mut hi = self.next()?;
            if hi == '\\' {
                let class = self.escape(true)?;
                match class.ranges.as_slice() {
                    [(a, b)] if a == b && !class.negated => hi = *a,
                    _ => return Err("a class as the end of a range".into()),
                }
            }
            if hi < lo {
                return Err(format!("invalid character class range {lo}-{hi}"));
            }
            return Ok((lo, hi));
        }
        Ok((lo, lo))
    }
}

/// The characters outside `ranges` (sorted, disjoint).
fn complement(ranges: &[(char, char)]) -> Vec<(char, char)> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut out = Vec::new();
    let mut next = 0u32;
    for (a, b) in sorted {
        if (a as u32) > next
            && let (Some(lo), Some(hi)) = (char::from_u32(next), char::from_u32(a as u32 - 1))
        {
            out.push((lo, hi));
        }
        next = next.max(b as u32 + 1);
    }
    if let Some(lo) = char::from_u32(next) {
        out.push((lo, char::MAX));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// What the schema uses

/// The keywords this module implements, and those it may ignore (documentation, what only the
/// CEL rules, pruning or defaulting use).
pub const KEYWORDS: &[&str] = &[
    "type",
    "format",
    "nullable",
    "x-kubernetes-int-or-string",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "items",
    "minItems",
    "maxItems",
    "properties",
    "required",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    // Ignored: a default is valid by construction, the types apply it.
    "default",
    "description",
    "title",
    // The CEL rules: StreamJobSpec::validate.
    "x-kubernetes-validations",
];

/// The schema's keywords, number formats and patterns that are beyond this module, where they
/// are: empty when it validates everything the schema says (a unit test holds the StreamJob
/// CRD to that). `status` is not validated, so it is not looked at.
pub fn unsupported(schema: &Value) -> Vec<String> {
    fn walk(s: &Value, path: &str, out: &mut Vec<String>) {
        let Some(map) = s.as_object() else {
            return out.push(format!("{path}: a schema that is no object"));
        };
        for (k, v) in map {
            if !KEYWORDS.contains(&k.as_str()) {
                out.push(format!("{path}: keyword {k}"));
            }
            match k.as_str() {
                "format" => {
                    let ty = map.get("type").and_then(Value::as_str);
                    let ok = matches!(
                        (ty, v.as_str()),
                        (Some("integer"), Some("int32" | "int64"))
                            | (Some("number"), Some("float" | "double"))
                    );
                    if !ok {
                        out.push(format!("{path}: format {v} of type {ty:?}"));
                    }
                }
                "pattern" => {
                    if let Err(e) = Pattern::new(v.as_str().unwrap_or_default()) {
                        out.push(format!("{path}: pattern {v}: {e}"));
                    }
                }
                "additionalProperties" if !v.is_object() => {
                    out.push(format!("{path}: additionalProperties {v}"));
                }
                "properties" => {
                    for (name, sub) in v.as_object().into_iter().flatten() {
                        if path.is_empty() && name == "status" {
                            continue;
                        }
                        walk(sub, &child(path, name), out);
                    }
                }
                "items" | "additionalProperties" => walk(v, &format!("{path}[*]"), out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, "", &mut out);
    out
}

/// Every distinct pattern in `schema` (for tests).
pub fn patterns(schema: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(p)) = map.get("pattern") {
                    out.insert(p.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(schema, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> &'static Value {
        Crd::stream_job().schema("weir.dev/v1alpha1").expect("v1alpha1 is served")
    }

    /// A manifest with `spec` (indented lines) before a valid two-operator pipeline.
    fn manifest(spec: &str) -> Value {
        let text = format!(
            "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\nspec:\n{spec}\n  pipeline:\n    operators:\n      - {{uid: src, type: generator, count: 10}}\n      - {{uid: out, type: stdout, inputs: [src]}}\n"
        );
        serde_saphyr::from_str(&text).unwrap()
    }

    fn errors_of(mut v: Value) -> Vec<String> {
        validate(schema(), &mut v).into_iter().map(|e| e.message).collect()
    }

    fn errors(spec: &str) -> Vec<String> {
        errors_of(manifest(spec))
    }

    #[test]
    fn the_crd_serves_v1alpha1_of_group_weir_dev() {
        let crd = Crd::stream_job();
        assert_eq!((crd.group.as_str(), crd.kind.as_str()), ("weir.dev", "StreamJob"));
        assert_eq!(crd.api_versions(), ["weir.dev/v1alpha1"]);
        assert!(crd.schema("weir.dev/v1").is_none() && crd.schema("other.dev/v1alpha1").is_none());
    }

    /// Every keyword, number format and pattern of the schema (but `status`, which a create
    /// cannot set) is one this module checks: a new one in the CRD fails here until it is.
    #[test]
    fn the_schema_says_nothing_this_module_does_not_check() {
        for (version, schema) in &Crd::stream_job().versions {
            let beyond = unsupported(schema);
            assert!(beyond.is_empty(), "{version}: {beyond:#?}");
        }
    }

    /// What Go's `regexp.MatchString` answers for these pairs (run with the Go toolchain that
    /// built the test environment's apiserver); the schema's patterns first.
    const GO_MATCHES: &[(&str, &[(&str, bool)])] = &[
        (
            r"^([0-9]+(ms|s|m|h|d))+$",
            &[
                ("10s", true),
                ("1m30s", true),
                ("0s", true),
                ("500ms", true),
                ("1h", true),
                ("7d", true),
                ("", false),
                ("10", false),
                ("10 seconds", false),
                ("1.5s", false),
                ("10S", false),
                ("s", false),
                ("10sm", false),
                ("1m30", false),
                ("10ms5s", true),
                (" 10s", false),
                ("10s\n", false),
                ("0m0ms", true),
                ("99999999999999999999d", true),
            ],
        ),
        (
            r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/([^\s/.][^\s/]*|\.([^\s/.][^\s/]*)?|\.\.[^\s/]+)?)*|file:///[^\s]*|/[^\s]*)$",
            &[
                ("s3://bucket/x", true),
                ("s3://b/x", false),
                ("s3://bu/x", false),
                ("s3://bucket", true),
                ("s3://bucket/", true),
                ("s3://bucket/a/../b", false),
                ("s3://bucket/./x", true),
                ("s3://bucket/.x", true),
                ("s3://bucket/..x", true),
                ("s3://Bucket/x", false),
                ("s3://bucket//x", true),
                ("/var/tmp/x", true),
                ("/", true),
                ("relative/path", false),
                ("file:///tmp/x", true),
                ("file://host/x", false),
                ("gs://bucket/x", false),
                ("/tmp/a b", false),
                ("s3://my-bucket.example/p", true),
                ("s3://bucket/a/..", false),
                ("s3://bucket/a/.", true),
                ("/tmp/\u{e9}", true),
                ("s3://bucket-/x", false),
                ("/tmp/a\u{a0}b", true),
                ("s3://bucket/a\tb", false),
                ("s3://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/x", true),
                ("s3://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/x", false),
            ],
        ),
        (
            r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
            &[
                ("500m", true),
                ("1Gi", true),
                ("1", true),
                ("+1", true),
                ("-1", true),
                ("1.5", true),
                (".5", true),
                ("1.", true),
                ("1e3", true),
                ("1E-3", true),
                ("1Ki", true),
                ("1k", true),
                ("1K", false),
                ("abc", false),
                ("", false),
                ("1 Gi", false),
                ("1.5Gi", true),
                ("0.1u", true),
                ("1ee", false),
                ("1e", false),
                ("+.5e+2", true),
                ("1Mi", true),
                ("2Ti", true),
                ("1m5", false),
            ],
        ),
        (
            r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$",
            &[
                ("src", true),
                ("a", true),
                ("my-source", true),
                ("my_source", true),
                ("a-", false),
                ("-a", false),
                ("A", false),
                ("My Source", false),
                ("a1", true),
                ("1a", true),
                ("a.b", false),
                ("_a", false),
                ("a_", false),
                ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", true),
                ("a--b", true),
            ],
        ),
        (
            r"^[a-z][a-z0-9_]*$",
            &[
                ("generator", true),
                ("file_source", true),
                ("File", false),
                ("1type", false),
                ("a1_b", true),
                ("", false),
                ("a-b", false),
                ("x", true),
            ],
        ),
        (
            r"^https?://[^\s/]+(/.*)?$",
            &[
                ("http://minio:9000", true),
                ("https://s3.example.com", true),
                ("https://s3.example.com/path", true),
                ("minio:9000", false),
                ("http://", false),
                ("http:// x", false),
                ("ftp://x", false),
                ("http://a/b c", true),
                ("https://a\n", false),
                ("https://a/\n", false),
                ("HTTP://a", false),
            ],
        ),
        (r"a{2,3}", &[("a", false), ("aa", true), ("aaa", true), ("aaaa", true), ("b", false)]),
        (r"^a{2,3}$", &[("a", false), ("aa", true), ("aaa", true), ("aaaa", false)]),
        (
            r"^(ab|cd)*e?$",
            &[
                ("", true),
                ("abcd", true),
                ("abe", true),
                ("abc", false),
                ("e", true),
                ("ee", false),
            ],
        ),
        (r"^[^]a]+$", &[("bcd", true), ("b]", false), ("a", false), ("", false)]),
        (r"\S+@\S+", &[("x@y", true), (" @ ", false), ("a b@c", true)]),
        (r"^.$", &[("a", true), ("\n", false), ("\u{e9}", true)]),
        (r"x*", &[("", true), ("abc", true)]),
        (r"^a.c$", &[("abc", true), ("a\nc", false)]),
        (r"^[\d\w-]+$", &[("a-1_B", true), ("a b", false)]),
        (r"^a{0}b$", &[("b", true), ("ab", false)]),
        (r"^(a|b|)c$", &[("c", true), ("ac", true), ("bc", true), ("dc", false)]),
        (r"^x{3,}$", &[("xx", false), ("xxx", true), ("xxxxxx", true)]),
        (r"^a\.b\+$", &[("a.b+", true), ("axb+", false), ("a.bb", false)]),
        (r"^[\S]+$", &[("ab", true), ("a b", false)]),
        (r"^[a\-z]$", &[("-", true), ("b", false), ("a", true), ("z", true)]),
        (r"^a{,3}$", &[("a{,3}", true), ("aaa", false)]),
        (r"^(?:ab)+$", &[("abab", true), ("aba", false)]),
    ];

    #[test]
    fn patterns_match_as_gos_regexp_does() {
        for (pattern, cases) in GO_MATCHES {
            let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            for (text, want) in *cases {
                assert_eq!(p.is_match(text), *want, "{pattern} on {text:?}");
            }
        }
    }

    #[test]
    fn every_pattern_of_the_schema_has_cases_checked_against_go() {
        for (_, schema) in &Crd::stream_job().versions {
            for p in patterns(schema) {
                assert!(
                    GO_MATCHES.iter().any(|(q, _)| *q == p),
                    "pattern {p} has no cases in GO_MATCHES: add some, with Go's answers"
                );
            }
        }
    }

    #[test]
    fn patterns_beyond_the_matcher_are_refused_when_built() {
        for p in
            [r"\bword\b", r"(?i)abc", r"[[:alpha:]]", r"a**", r"(a", r"[a-", r"x{2000}", r"\pL"]
        {
            assert!(Pattern::new(p).is_err(), "{p}");
        }
    }

    #[test]
    fn a_long_text_is_matched_in_linear_time() {
        let p = Pattern::new(crate_storage_pattern()).unwrap();
        let text = format!("s3://bucket/{} ", "a/".repeat(50_000));
        let t = std::time::Instant::now();
        assert!(!p.is_match(&text));
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    }

    fn crate_storage_pattern() -> &'static str {
        weir_crds::storage_uri::STORAGE_URI_PATTERN
    }

    #[test]
    fn good_manifests_pass() {
        assert_eq!(errors(""), Vec::<String>::new());
        // Free-form objects keep what they hold; whole floats are integers; nulls where the
        // schema takes none are dropped.
        assert_eq!(
            errors(
                "  parallelism: 2.0\n  podTemplate: {spec: {nodeSelector: {a: b}, whatever: [1]}}\n  resources: {worker: {requests: {cpu: 1, memory: 1Gi}}}\n  checkpointing: null\n  restore: {snapshot: null}\n  networkPolicy: {enabled: yes}"
            ),
            Vec::<String>::new()
        );
        let mut v = manifest("  parallelism: null\n  checkpointing: null\n  maxParallelism: null");
        assert!(validate(schema(), &mut v).is_empty());
        // The default for a field that takes no null, no field where there is none; a null
        // where the schema takes one stays.
        assert_eq!(v["spec"]["parallelism"], Value::from(1));
        assert!(v["spec"].get("checkpointing").is_none(), "{v}");
        assert_eq!(v["spec"]["maxParallelism"], Value::Null);
        let mut v = manifest("  parallelism: 2.0\n  restartStrategy: {jitter: 1.0}");
        assert!(validate(schema(), &mut v).is_empty());
        assert_eq!(v["spec"]["parallelism"], Value::from(2));
        assert_eq!(v["spec"]["restartStrategy"]["jitter"], Value::from(1));
        // Operator parameters are the plan's to check.
        let mut v = manifest("");
        v["spec"]["pipeline"]["operators"][0]["extra"] =
            serde_json::json!({"deep": [1, {"x": null}]});
        assert_eq!(errors_of(v), Vec::<String>::new());
    }

    /// The messages of the real apiserver (kube-apiserver 1.37.2, `kubectl create
    /// --dry-run=server` of the same manifests), word for word.
    #[test]
    fn errors_are_in_the_apiservers_words() {
        let cases: &[(&str, &[&str])] = &[
            (
                "  checkpointing: {retained: 0, maxConcurrent: 0, tolerableFailures: -1}",
                &[
                    "spec.checkpointing.maxConcurrent: Invalid value: 0: spec.checkpointing.maxConcurrent in body should be greater than or equal to 1",
                    "spec.checkpointing.retained: Invalid value: 0: spec.checkpointing.retained in body should be greater than or equal to 1",
                    "spec.checkpointing.tolerableFailures: Invalid value: -1: spec.checkpointing.tolerableFailures in body should be greater than or equal to 0",
                ],
            ),
            (
                "  checkpointing: {interval: 10 seconds}",
                &[
                    "spec.checkpointing.interval: Invalid value: \"10 seconds\": spec.checkpointing.interval in body should match '^([0-9]+(ms|s|m|h|d))+$'",
                ],
            ),
            (
                "  parallelism: two",
                &[
                    "spec.parallelism: Invalid value: \"string\": spec.parallelism in body must be of type integer: \"string\"",
                ],
            ),
            (
                "  parallelism: 2.5",
                &[
                    "spec.parallelism: Invalid value: \"float64\": spec.parallelism in body must be of type int32: \"float64\"",
                    "<nil>: Invalid value: \"\": Checked value must be of type integer with format int32 in spec.parallelism",
                ],
            ),
            (
                "  parallelism: true",
                &[
                    "spec.parallelism: Invalid value: \"\": spec.parallelism in body must be of type int32: \"\"",
                ],
            ),
            (
                "  parallelism: 3000000000",
                &[
                    "<nil>: Invalid value: \"\": Checked value must be of type integer with format int32 in spec.parallelism",
                    "spec.parallelism: Invalid value: 3000000000: spec.parallelism in body should be less than or equal to 32768",
                ],
            ),
            (
                "  restartStrategy: {jitter: 1.5, backoffMultiplier: 0.5}",
                &[
                    "spec.restartStrategy.backoffMultiplier: Invalid value: 0.5: spec.restartStrategy.backoffMultiplier in body should be greater than or equal to 1",
                    "spec.restartStrategy.jitter: Invalid value: 1.5: spec.restartStrategy.jitter in body should be less than or equal to 1",
                ],
            ),
            (
                "  restartStrategy: {delay: \"5\", type: sometimes}",
                &[
                    "spec.restartStrategy.delay: Invalid value: \"5\": spec.restartStrategy.delay in body should match '^([0-9]+(ms|s|m|h|d))+$'",
                    "spec.restartStrategy.type: Unsupported value: \"sometimes\": supported values: \"exponential-delay\", \"fixed-delay\", \"failure-rate\", \"none\"",
                ],
            ),
            (
                "  upgradeMode: yolo",
                &[
                    "spec.upgradeMode: Unsupported value: \"yolo\": supported values: \"savepoint\", \"last-state\", \"stateless\"",
                ],
            ),
            (
                "  checkpointing: {mode: 5}",
                &[
                    "spec.checkpointing.mode: Invalid value: \"integer\": spec.checkpointing.mode in body must be of type string: \"integer\"",
                    "spec.checkpointing.mode: Unsupported value: 5: supported values: \"exactly-once\", \"at-least-once\"",
                ],
            ),
            (
                "  imagePullPolicy: null",
                &[
                    "spec.imagePullPolicy: Unsupported value: null: supported values: \"Always\", \"IfNotPresent\", \"Never\"",
                ],
            ),
            (
                "  checkpointing: {storage: gs://bucket/x}",
                &[
                    r#"spec.checkpointing.storage: Invalid value: "gs://bucket/x": spec.checkpointing.storage in body should match '^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/([^\s/.][^\s/]*|\.([^\s/.][^\s/]*)?|\.\.[^\s/]+)?)*|file:///[^\s]*|/[^\s]*)$'"#,
                ],
            ),
            (
                "  s3: {endpoint: minio:9000}",
                &[
                    r#"spec.s3.endpoint: Invalid value: "minio:9000": spec.s3.endpoint in body should match '^https?://[^\s/]+(/.*)?$'"#,
                ],
            ),
            (
                "  resources: {worker: {requests: {cpu: 0.5, memory: 1Gi, x: abc}}}",
                &[
                    "spec.resources.worker.requests.cpu: Invalid value: \"number\": spec.resources.worker.requests.cpu in body must be of type integer,string: \"number\"",
                    r#"spec.resources.worker.requests.x: Invalid value: "abc": spec.resources.worker.requests.x in body should match '^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$'"#,
                ],
            ),
            (
                "  s3: {credentialsSecret: {name: ''}}",
                &[
                    "spec.s3.credentialsSecret.name: Invalid value: \"\": spec.s3.credentialsSecret.name in body should be at least 1 chars long",
                ],
            ),
            ("  s3: {credentialsSecret: {}}", &["spec.s3.credentialsSecret.name: Required value"]),
            (
                "  state: paused",
                &[
                    "spec.state: Unsupported value: \"paused\": supported values: \"running\", \"suspended\"",
                ],
            ),
            (
                "  maxParallelism: 32769",
                &[
                    "spec.maxParallelism: Invalid value: 32769: spec.maxParallelism in body should be less than or equal to 32768",
                ],
            ),
            (
                "  checkpointing: {interval: 10}",
                &[
                    "spec.checkpointing.interval: Invalid value: \"integer\": spec.checkpointing.interval in body must be of type string: \"integer\"",
                ],
            ),
            (
                "  savepoints: {retention: {maxCount: 0}}",
                &[
                    "spec.savepoints.retention.maxCount: Invalid value: 0: spec.savepoints.retention.maxCount in body should be greater than or equal to 1",
                ],
            ),
            (
                "  networkPolicy: {enabled: \"true\"}",
                &[
                    "spec.networkPolicy.enabled: Invalid value: \"string\": spec.networkPolicy.enabled in body must be of type boolean: \"string\"",
                ],
            ),
            (
                "  restartNonce: 1.5",
                &[
                    "spec.restartNonce: Invalid value: \"float64\": spec.restartNonce in body must be of type int64: \"float64\"",
                    "<nil>: Invalid value: \"\": Checked value must be of type integer with format int64 in spec.restartNonce",
                ],
            ),
            (
                "  restartNonce: 18446744073709551615",
                &[
                    "spec.restartNonce: Invalid value: \"float64\": spec.restartNonce in body must be of type int64: \"float64\"",
                    "<nil>: Invalid value: \"\": Checked value must be of type integer with format int64 in spec.restartNonce",
                ],
            ),
            (
                "  checkpointing: {alignmentTimeout: 1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s}",
                &["spec.checkpointing.alignmentTimeout: Too long: may not be more than 64 bytes"],
            ),
            ("  stateBackends: rocks", &["unknown field \"spec.stateBackends\""]),
            (
                "  stateBackend: rocks",
                &[
                    "spec.stateBackend: Unsupported value: \"rocks\": supported values: \"rocksdb\", \"heap\"",
                ],
            ),
            ("  restartStrategy: {dealy: 1s}", &["unknown field \"spec.restartStrategy.dealy\""]),
            (
                "  image: {a: 1}",
                &[
                    "unknown field \"spec.image.a\"",
                    "spec.image: Invalid value: \"object\": spec.image in body must be of type string: \"object\"",
                ],
            ),
        ];
        for (spec, want) in cases {
            let mut got = errors(spec);
            let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            // (The apiserver's order is Go's map order.)
            got.sort();
            want.sort();
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn operators_fields_are_named_by_index() {
        let ops = |ops: &str| {
            let text = format!(
                "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\nspec:\n  pipeline:\n    operators:\n{ops}"
            );
            errors_of(serde_saphyr::from_str(&text).unwrap())
        };
        assert_eq!(
            ops("      - {uid: My Source, type: generator}\n"),
            [
                "spec.pipeline.operators[0].uid: Invalid value: \"My Source\": spec.pipeline.operators[0].uid in body should match '^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$'"
            ]
        );
        assert_eq!(
            ops("      - {uid: \"\", type: generator}\n"),
            [
                "spec.pipeline.operators[0].uid: Invalid value: \"\": spec.pipeline.operators[0].uid in body should be at least 1 chars long"
            ]
        );
        assert_eq!(
            ops(&format!("      - {{uid: {}, type: generator}}\n", "a".repeat(70))),
            ["spec.pipeline.operators[0].uid: Too long: may not be more than 63 bytes"]
        );
        assert_eq!(
            ops("      - {uid: a, type: generator}\n      - {uid: b, inputs: [a]}\n"),
            ["spec.pipeline.operators[1].type: Required value"]
        );
        assert_eq!(
            ops("      - {uid: a, type: generator}\n      - null\n"),
            [
                "spec.pipeline.operators[1]: Invalid value: \"null\": spec.pipeline.operators[1] in body must be of type object: \"null\""
            ]
        );
        assert_eq!(
            ops("      - {uid: a, type: generator}\n      - {uid: b, type: stdout, inputs: a}\n"),
            [
                "spec.pipeline.operators[1].inputs: Invalid value: \"string\": spec.pipeline.operators[1].inputs in body must be of type array: \"string\""
            ]
        );
        assert_eq!(
            ops(
                "      - {uid: a, type: generator}\n      - {uid: b, type: stdout, inputs: [a, null]}\n"
            ),
            [
                "spec.pipeline.operators[1].inputs[1]: Invalid value: \"null\": spec.pipeline.operators[1].inputs[1] in body must be of type string: \"null\""
            ]
        );
        let many = vec!["a"; 66].join(", ");
        assert_eq!(
            ops(&format!(
                "      - {{uid: a, type: generator}}\n      - {{uid: b, type: stdout, inputs: [{many}]}}\n"
            )),
            ["spec.pipeline.operators[1].inputs: Too many: 66: must have at most 64 items"]
        );
        assert_eq!(
            ops("      []\n"),
            [
                "spec.pipeline.operators: Invalid value: 0: spec.pipeline.operators in body should have at least 1 items"
            ]
        );
        // An unknown field of an operator is a parameter: the plan refuses those it does not
        // know.
        assert_eq!(ops("      - {uid: a, type: generator, uid2: x}\n"), Vec::<String>::new());
    }

    #[test]
    fn required_and_null_at_the_top() {
        let job = |rest: &str| {
            let text = format!(
                "apiVersion: weir.dev/v1alpha1\nkind: StreamJob\nmetadata: {{name: wc}}\n{rest}"
            );
            errors_of(serde_saphyr::from_str(&text).unwrap())
        };
        assert_eq!(job(""), ["spec: Required value"]);
        assert_eq!(job("spec: null\n"), ["spec: Required value"]);
        assert_eq!(job("spec: {parallelism: 2}\n"), ["spec.pipeline: Required value"]);
        assert_eq!(
            job("spec: often\n"),
            ["spec: Invalid value: \"string\": spec in body must be of type object: \"string\""]
        );
    }

    /// Strict field validation: unknown fields of the object, its metadata and its status, in
    /// the apiserver's order (metadata first, then sorted); `status` then goes (a create
    /// cannot set it), unchecked.
    #[test]
    fn unknown_fields_everywhere_but_free_form_objects() {
        let mut v = manifest("");
        v["metadata"]["nmae"] = "x".into();
        v["metadata"]["labels"] = serde_json::json!({"a": "b"});
        v["specs"] = serde_json::json!({});
        v["status"] = serde_json::json!({"phase": "Bogus", "foo": 1});
        assert_eq!(
            errors_of(v.clone()),
            [
                "unknown field \"metadata.nmae\"",
                "unknown field \"specs\"",
                "unknown field \"status.foo\""
            ]
        );
        v.as_object_mut().unwrap().retain(|k, _| k != "specs");
        v["metadata"].as_object_mut().unwrap().remove("nmae");
        v["status"].as_object_mut().unwrap().remove("foo");
        assert!(validate(schema(), &mut v).is_empty());
        assert!(v.get("status").is_none(), "{v}");
    }

    #[test]
    fn type_meta_is_checked_first() {
        let refused = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut v = manifest("  stateBackends: rocks");
            edit(v.as_object_mut().unwrap());
            admit(&mut v).unwrap_err().to_string()
        };
        assert_eq!(
            refused(&|m| {
                m.insert("kind".into(), "StreamJobs".into());
            }),
            "no matches for kind \"StreamJobs\" in version \"weir.dev/v1alpha1\": weir runs kind: StreamJob, apiVersion: weir.dev/v1alpha1"
        );
        assert_eq!(
            refused(&|m| {
                m.insert("apiVersion".into(), "weir.dev/v1".into());
            }),
            "no matches for kind \"StreamJob\" in version \"weir.dev/v1\": weir runs kind: StreamJob, apiVersion: weir.dev/v1alpha1"
        );
        assert_eq!(
            refused(&|m| {
                m.remove("kind");
                m.remove("apiVersion");
            }),
            "apiVersion not set, kind not set: weir runs kind: StreamJob, apiVersion: weir.dev/v1alpha1"
        );
        assert_eq!(
            refused(&|m| {
                m.insert("kind".into(), 5.into());
            }),
            "kind: Invalid value: 5: must be a string"
        );
        let mut list: Value = serde_saphyr::from_str("- a\n- b\n").unwrap();
        assert_eq!(
            admit(&mut list).unwrap_err().to_string(),
            "not a StreamJob manifest: the document is a list, not a mapping"
        );
    }

    #[test]
    fn refusals_read_like_kubectls() {
        let mut one = manifest("  stateBackends: rocks");
        assert_eq!(
            admit(&mut one).unwrap_err().to_string(),
            "The StreamJob \"wc\" is invalid: unknown field \"spec.stateBackends\""
        );
        let mut two = manifest("  stateBackends: rocks\n  checkpointing: {retained: 0}");
        assert_eq!(
            admit(&mut two).unwrap_err().to_string(),
            "The StreamJob \"wc\" is invalid:\n* unknown field \"spec.stateBackends\"\n* spec.checkpointing.retained: Invalid value: 0: spec.checkpointing.retained in body should be greater than or equal to 1"
        );
        let mut many = manifest("");
        for i in 0..30 {
            many["spec"][format!("x{i:02}")] = 1.into();
        }
        let text = admit(&mut many).unwrap_err().to_string();
        assert!(text.ends_with("\n* ... and 5 more") && text.contains("\"spec.x24\""), "{text}");
    }

    #[test]
    fn values_are_written_as_go_writes_them() {
        let floats = [
            (0.5, "0.5"),
            (1.0, "1"),
            (100.0, "100"),
            (1234567.5, "1.2345675e+06"),
            (12345678.5, "1.23456785e+07"),
            (1e20, "1e+20"),
            (1e21, "1e+21"),
            (123456789012345678901234.0, "1.2345678901234569e+23"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5, "-2.5"),
            (32768.0, "32768"),
        ];
        for (f, want) in floats {
            assert_eq!(go_float(f), want, "{f}");
        }
        assert_eq!(
            go_quote("a\"b\\c\n\u{1}é\u{a0}\u{200b}\t"),
            "\"a\\\"b\\\\c\\n\\x01é\\u00a0\\u200b\\t\""
        );
    }

    /// Bounds the StreamJob schema does not use, in kube-openapi's words.
    #[test]
    fn exclusive_bounds() {
        let schema = serde_json::json!({"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 1, "exclusiveMinimum": true},
            "b": {"type": "number", "maximum": 0.5, "exclusiveMaximum": true},
        }});
        let mut v = serde_json::json!({"a": 1, "b": 0.5});
        let got: Vec<String> = validate(&schema, &mut v).into_iter().map(|e| e.message).collect();
        assert_eq!(
            got,
            [
                "a: Invalid value: 1: a in body should be greater than 1",
                "b: Invalid value: 0.5: b in body should be less than 0.5"
            ]
        );
        let mut v = serde_json::json!({"a": 2, "b": 0.25});
        assert!(validate(&schema, &mut v).is_empty());
    }

    #[test]
    fn object_meta_fields_are_read_from_its_type() {
        let fields = object_meta_fields();
        for f in ["name", "namespace", "labels", "annotations", "uid", "generation"] {
            assert!(fields.contains(&f), "{fields:?}");
        }
    }
}
