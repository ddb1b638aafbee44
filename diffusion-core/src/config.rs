//! Reading the JSON configuration files of a diffusers model folder.
//!
//! Files written by diffusers (Python's `json` module) may contain the non-standard
//! tokens `NaN`, `Infinity` and `-Infinity`, e.g. `"lambda_min_clipped": -Infinity`.
//! [`ConfigMap::parse`] accepts them: outside string literals they are rewritten to the
//! marker strings [`NAN`], [`INFINITY`] and [`NEG_INFINITY`], which the field
//! deserialisers [`lenient_f64`] and [`lenient_opt_f64`] turn back into floats.

use std::path::Path;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Marker string standing for a JSON `NaN` token.
pub const NAN: &str = "NaN";
/// Marker string standing for a JSON `Infinity` token.
pub const INFINITY: &str = "Infinity";
/// Marker string standing for a JSON `-Infinity` token.
pub const NEG_INFINITY: &str = "-Infinity";

/// The key/value pairs of one `config.json` / `scheduler_config.json`.
///
/// Typed configs are read from it with [`ConfigMap::deserialize`]; unknown keys (including
/// diffusers' bookkeeping keys such as `_class_name`) are ignored by those types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigMap(pub Map<String, Value>);

impl ConfigMap {
    /// An empty map: every typed config read from it takes its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a JSON object, accepting Python's `NaN` / `Infinity` / `-Infinity` tokens.
    pub fn parse(text: &str, context: &str) -> Result<Self> {
        let cleaned = replace_non_finite_tokens(text);
        let value: Value = serde_json::from_str(&cleaned).map_err(|e| Error::Json {
            context: context.to_string(),
            message: e.to_string(),
        })?;
        Self::from_value(value, context)
    }

    /// Wraps a JSON value, which must be an object.
    pub fn from_value(value: Value, context: &str) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(Error::Json {
                context: context.to_string(),
                message: format!("expected a JSON object, found {other}"),
            }),
        }
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The diffusers class recorded in the file (`_class_name`), if any.
    pub fn class_name(&self) -> Option<&str> {
        self.0.get("_class_name").and_then(Value::as_str)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// Sets `key` to `value`, replacing any previous value.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(key.to_string(), value.into());
    }

    /// Deserialises a typed config; keys the type does not know are ignored.
    pub fn deserialize<T: DeserializeOwned>(&self, context: &str) -> Result<T> {
        T::deserialize(Value::Object(self.0.clone())).map_err(|e| {
            // serde_json reports "invalid type ... for key" without the key; keep its text.
            Error::Json {
                context: context.to_string(),
                message: e.to_string(),
            }
        })
    }
}

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` tokens (outside string literals) into
/// the marker strings `"NaN"`, `"Infinity"` and `"-Infinity"`.
pub fn replace_non_finite_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.char_indices().peekable();
    let mut in_string = false;
    let mut escaped = false;
    while let Some((i, c)) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        let rest = &text[i..];
        let token = [NEG_INFINITY, INFINITY, NAN]
            .into_iter()
            .find(|t| rest.starts_with(t) && !continues_identifier(&rest[t.len()..]));
        if let Some(token) = token {
            out.push('"');
            out.push_str(token);
            out.push('"');
            for _ in 1..token.chars().count() {
                chars.next();
            }
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    out
}

fn continues_identifier(rest: &str) -> bool {
    rest.chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrMarker {
    Number(f64),
    Marker(String),
}

fn marker_to_f64<E: de::Error>(v: NumberOrMarker) -> Result<f64, E> {
    match v {
        NumberOrMarker::Number(x) => Ok(x),
        NumberOrMarker::Marker(s) => match s.as_str() {
            NAN => Ok(f64::NAN),
            INFINITY => Ok(f64::INFINITY),
            NEG_INFINITY => Ok(f64::NEG_INFINITY),
            other => Err(E::custom(format!(
                "expected a number, found string {other:?}"
            ))),
        },
    }
}

/// Field deserialiser for an `f64` that may be written as `NaN` / `Infinity` / `-Infinity`.
pub fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    marker_to_f64(NumberOrMarker::deserialize(d)?)
}

/// Field deserialiser for an optional `f64` (JSON `null` is `None`) that may be written as
/// `NaN` / `Infinity` / `-Infinity`.
pub fn lenient_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Option::<NumberOrMarker>::deserialize(d)? {
        None => Ok(None),
        Some(v) => marker_to_f64(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Probe {
        #[serde(deserialize_with = "lenient_f64")]
        a: f64,
        #[serde(default, deserialize_with = "lenient_opt_f64")]
        b: Option<f64>,
        #[serde(default, deserialize_with = "lenient_opt_f64")]
        c: Option<f64>,
        s: String,
    }

    #[test]
    fn parses_python_non_finite_tokens() {
        let text =
            r#"{"a": -Infinity, "b": NaN, "c": null, "s": "Infinity \"NaN\"", "_class_name": "X"}"#;
        let map = ConfigMap::parse(text, "test").unwrap();
        let p: Probe = map.deserialize("test").unwrap();
        assert_eq!(p.a, f64::NEG_INFINITY);
        assert!(p.b.unwrap().is_nan());
        assert_eq!(p.c, None);
        assert_eq!(p.s, "Infinity \"NaN\"");
        assert_eq!(map.class_name(), Some("X"));
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        assert!(matches!(
            ConfigMap::parse("[1, 2]", "t"),
            Err(Error::Json { .. })
        ));
        assert!(matches!(
            ConfigMap::parse("{\"a\": ", "t"),
            Err(Error::Json { .. })
        ));
        let map = ConfigMap::parse(r#"{"a": "Infinityx", "s": ""}"#, "t").unwrap();
        assert!(map.deserialize::<Probe>("t").is_err());
    }

    #[test]
    fn identifier_prefixes_are_left_alone() {
        assert_eq!(replace_non_finite_tokens("[NaNa]"), "[NaNa]");
        assert_eq!(replace_non_finite_tokens("[Infinity]"), "[\"Infinity\"]");
    }
}
