//! Record filters in the pattern syntax AWS Lambda's event filtering uses
//! (EventBridge patterns): a record is handled only when some pattern
//! matches it. See docs/schemas.md.
//!
//! A pattern is a JSON object that mirrors the record's shape (`key`,
//! `value`, `headers`, `topic`, `partition`, `offset`, `timestamp_ms`).
//! Each leaf is an array of conditions, any of which may match: a literal
//! (string, number, true, false, null: equality, numbers compared as
//! numbers), `{"prefix": "a"}`, `{"suffix": "z"}`,
//! `{"equals-ignore-case": "A"}`, `{"numeric": [">", 0, "<=", 5]}` (on
//! numbers, and on strings that are numbers: decoded decimals and 64-bit
//! integers),
//! `{"exists": true|false}`, `{"anything-but": x}` (x a literal, an array
//! of literals, or `{"prefix"|"suffix": s}`). All fields of an object must
//! match; `"$or": [pattern, ...]` needs one of its patterns. Where the
//! record holds an array, a leaf matches when any element does. Several
//! `--filter`s: a record passes when any of them matches.

use serde_json::{Map, Value};
use thiserror::Error;

/// The deepest pattern accepted (a mistake, not a filter, past it).
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("--filter: {0}")]
pub struct FilterError(String);

fn err<T>(at: &str, why: impl std::fmt::Display) -> Result<T, FilterError> {
    let at = if at.is_empty() { "the pattern" } else { at };
    Err(FilterError(format!("{at}: {why}")))
}

/// Patterns, any of which lets a record through.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    patterns: Vec<Object>,
}

#[derive(Debug, Clone, PartialEq)]
struct Object {
    fields: Vec<(String, Node)>,
    /// `$or`: each inner list holds alternatives, one of which must match.
    any_of: Vec<Vec<Object>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Object(Object),
    Conditions(Vec<Condition>),
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Equals(Value),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    Numeric(Vec<(Op, f64)>),
    Exists(bool),
    AnythingBut(Vec<Value>),
    AnythingButPrefix(String),
    AnythingButSuffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

impl Filter {
    /// Parses each `--filter` value.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, FilterError> {
        let mut parsed = Vec::with_capacity(patterns.len());
        for (i, text) in patterns.iter().enumerate() {
            let value: Value = serde_json::from_str(text.as_ref())
                .or_else(|e| err(&format!("pattern {}", i + 1), format!("not JSON ({e})")))?;
            let Value::Object(map) = value else {
                return err(&format!("pattern {}", i + 1), "must be a JSON object");
            };
            parsed.push(object(&map, "", 0)?);
        }
        Ok(Self { patterns: parsed })
    }

    /// Whether the record (as JSON: `key`, `value`, ...) passes.
    pub fn matches(&self, record: &Value) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| object_matches(p, record))
    }
}

fn object(map: &Map<String, Value>, at: &str, depth: usize) -> Result<Object, FilterError> {
    if depth > MAX_DEPTH {
        return err(at, format!("nested deeper than {MAX_DEPTH}"));
    }
    if map.is_empty() {
        return err(at, "an empty object matches nothing; leave the field out");
    }
    let mut out = Object {
        fields: Vec::new(),
        any_of: Vec::new(),
    };
    for (name, value) in map {
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}.{name}")
        };
        if name == "$or" {
            let Value::Array(alternatives) = value else {
                return err(&path, "must be an array of patterns");
            };
            if alternatives.len() < 2 {
                return err(&path, "needs at least two patterns");
            }
            let mut parsed = Vec::new();
            for alt in alternatives {
                let Value::Object(alt) = alt else {
                    return err(&path, "each alternative must be an object");
                };
                parsed.push(object(alt, at, depth + 1)?);
            }
            out.any_of.push(parsed);
            continue;
        }
        let node = match value {
            Value::Object(inner) => Node::Object(object(inner, &path, depth + 1)?),
            Value::Array(items) => Node::Conditions(conditions(items, &path)?),
            _ => return err(&path, "a leaf must be an array of conditions, e.g. [\"a\"]"),
        };
        out.fields.push((name.clone(), node));
    }
    Ok(out)
}

fn conditions(items: &[Value], at: &str) -> Result<Vec<Condition>, FilterError> {
    if items.is_empty() {
        return err(at, "an empty array matches nothing");
    }
    items.iter().map(|item| condition(item, at)).collect()
}

fn text<'a>(value: &'a Value, at: &str, what: &str) -> Result<&'a str, FilterError> {
    value
        .as_str()
        .map_or_else(|| err(at, format!("{what} takes a string")), Ok)
}

fn literal(value: &Value) -> bool {
    matches!(
        value,
        Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null
    )
}

fn condition(item: &Value, at: &str) -> Result<Condition, FilterError> {
    let Value::Object(map) = item else {
        return Ok(Condition::Equals(item.clone())).and_then(|c| {
            if literal(item) {
                Ok(c)
            } else {
                err(at, "arrays do not nest")
            }
        });
    };
    if map.len() != 1 {
        return err(
            at,
            "a condition object has exactly one key, e.g. {\"prefix\": \"a\"}",
        );
    }
    let (op, arg) = map.iter().next().expect("one entry");
    Ok(match op.as_str() {
        "prefix" => Condition::Prefix(text(arg, at, "prefix")?.to_string()),
        "suffix" => Condition::Suffix(text(arg, at, "suffix")?.to_string()),
        "equals-ignore-case" => {
            Condition::EqualsIgnoreCase(text(arg, at, "equals-ignore-case")?.to_lowercase())
        }
        "exists" => match arg {
            Value::Bool(b) => Condition::Exists(*b),
            _ => return err(at, "exists takes true or false"),
        },
        "numeric" => Condition::Numeric(numeric(arg, at)?),
        "anything-but" => {
            match arg {
                Value::Array(values) if !values.is_empty() && values.iter().all(literal) => {
                    Condition::AnythingBut(values.clone())
                }
                Value::Object(inner) if inner.len() == 1 => {
                    let (kind, s) = inner.iter().next().expect("one entry");
                    let s = text(s, at, kind)?.to_string();
                    match kind.as_str() {
                        "prefix" => Condition::AnythingButPrefix(s),
                        "suffix" => Condition::AnythingButSuffix(s),
                        other => return err(at, format!("anything-but does not take {other}")),
                    }
                }
                v if literal(v) => Condition::AnythingBut(vec![v.clone()]),
                _ => return err(
                    at,
                    "anything-but takes a value, an array of values, or {\"prefix\"|\"suffix\": s}",
                ),
            }
        }
        other => {
            return err(
                at,
                format!(
                    "unknown condition {other} (prefix, suffix, equals-ignore-case, numeric, \
                     exists, anything-but)"
                ),
            )
        }
    })
}

fn numeric(arg: &Value, at: &str) -> Result<Vec<(Op, f64)>, FilterError> {
    let Value::Array(items) = arg else {
        return err(at, "numeric takes an array such as [\">\", 0, \"<=\", 5]");
    };
    if items.is_empty() || items.len() % 2 != 0 || items.len() > 4 {
        return err(at, "numeric takes one or two (operator, number) pairs");
    }
    items
        .chunks(2)
        .map(|pair| {
            let op = match pair[0].as_str() {
                Some("<") => Op::Lt,
                Some("<=") => Op::Le,
                Some("=") => Op::Eq,
                Some(">=") => Op::Ge,
                Some(">") => Op::Gt,
                _ => return err(at, "numeric operators are <, <=, =, >=, >"),
            };
            match pair[1].as_f64() {
                Some(n) => Ok((op, n)),
                None => err(at, "numeric compares with a number"),
            }
        })
        .collect()
}

fn object_matches(pattern: &Object, value: &Value) -> bool {
    pattern
        .fields
        .iter()
        .all(|(name, node)| field_matches(node, field(value, name)))
        && pattern
            .any_of
            .iter()
            .all(|alts| alts.iter().any(|alt| object_matches(alt, value)))
}

/// The values a field holds: several where objects sit in an array.
fn field<'a>(value: &'a Value, name: &str) -> Vec<&'a Value> {
    match value {
        Value::Object(map) => map.get(name).into_iter().collect(),
        Value::Array(items) => items.iter().flat_map(|i| field(i, name)).collect(),
        _ => Vec::new(),
    }
}

fn field_matches(node: &Node, found: Vec<&Value>) -> bool {
    match node {
        Node::Object(inner) => found.iter().any(|v| object_matches(inner, v)),
        Node::Conditions(conditions) => {
            let leaves: Vec<&Value> = found
                .iter()
                .flat_map(|v| match v {
                    Value::Array(items) => items.iter().collect::<Vec<_>>(),
                    other => vec![*other],
                })
                .collect();
            conditions.iter().any(|c| match c {
                Condition::Exists(want) => found.is_empty() != *want,
                _ => leaves.iter().any(|leaf| condition_matches(c, leaf)),
            })
        }
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A leaf as a number: a JSON number, or a string that is one (decoded
/// Avro decimals and Protobuf 64-bit integers are strings, to keep every
/// digit).
fn number(leaf: &Value) -> Option<f64> {
    match leaf {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

fn condition_matches(condition: &Condition, leaf: &Value) -> bool {
    let s = leaf.as_str();
    match condition {
        Condition::Equals(want) => equal(want, leaf),
        Condition::Prefix(p) => s.is_some_and(|s| s.starts_with(p.as_str())),
        Condition::Suffix(p) => s.is_some_and(|s| s.ends_with(p.as_str())),
        Condition::EqualsIgnoreCase(p) => s.is_some_and(|s| s.to_lowercase() == *p),
        Condition::Numeric(ops) => number(leaf).is_some_and(|n| {
            ops.iter().all(|(op, v)| match op {
                Op::Lt => n < *v,
                Op::Le => n <= *v,
                Op::Eq => n == *v,
                Op::Ge => n >= *v,
                Op::Gt => n > *v,
            })
        }),
        Condition::Exists(_) => unreachable!("decided on presence"),
        Condition::AnythingBut(values) => !values.iter().any(|v| equal(v, leaf)),
        Condition::AnythingButPrefix(p) => s.is_some_and(|s| !s.starts_with(p.as_str())),
        Condition::AnythingButSuffix(p) => s.is_some_and(|s| !s.ends_with(p.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn passes(patterns: &[&str], record: Value) -> bool {
        Filter::parse(patterns).unwrap().matches(&record)
    }

    #[test]
    fn each_condition_as_lambda_documents_it() {
        let r = json!({"key": "k1", "value": {"kind": "order", "total": 30, "city": "Paris",
                       "tags": ["a", "b"], "lines": [{"sku": "x"}, {"sku": "y"}], "gone": null}});
        assert!(passes(&[r#"{"value":{"kind":["order"]}}"#], r.clone()));
        assert!(!passes(&[r#"{"value":{"kind":["refund"]}}"#], r.clone()));
        assert!(
            passes(&[r#"{"value":{"total":[30.0]}}"#], r.clone()),
            "numbers as numbers"
        );
        assert!(passes(
            &[r#"{"value":{"city":[{"prefix":"Pa"}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"city":[{"suffix":"ris"}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"city":[{"equals-ignore-case":"PARIS"}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"total":[{"numeric":[">",0,"<=",30]}]}}"#],
            r.clone()
        ));
        assert!(!passes(
            &[r#"{"value":{"total":[{"numeric":[">",30]}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"city":[{"exists":true}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"zip":[{"exists":false}]}}"#],
            r.clone()
        ));
        assert!(!passes(
            &[r#"{"value":{"city":[{"exists":false}]}}"#],
            r.clone()
        ));
        assert!(passes(&[r#"{"value":{"gone":[null]}}"#], r.clone()));
        assert!(passes(
            &[r#"{"value":{"kind":[{"anything-but":["refund","void"]}]}}"#],
            r.clone()
        ));
        assert!(!passes(
            &[r#"{"value":{"kind":[{"anything-but":"order"}]}}"#],
            r.clone()
        ));
        assert!(passes(
            &[r#"{"value":{"city":[{"anything-but":{"prefix":"Lo"}}]}}"#],
            r.clone()
        ));
        assert!(
            !passes(&[r#"{"value":{"zip":[{"anything-but":"x"}]}}"#], r.clone()),
            "needs the field"
        );
        assert!(
            passes(&[r#"{"value":{"tags":["b"]}}"#], r.clone()),
            "any element of an array"
        );
        assert!(
            passes(&[r#"{"value":{"lines":{"sku":["y"]}}}"#], r.clone()),
            "objects in arrays"
        );
        assert!(passes(
            &[r#"{"key":["k1"],"value":{"kind":["order"]}}"#],
            r.clone()
        ));
        assert!(
            !passes(&[r#"{"key":["k2"],"value":{"kind":["order"]}}"#], r.clone()),
            "all fields"
        );
        assert!(passes(
            &[r#"{"value":{"$or":[{"kind":["x"]},{"city":["Paris"]}]}}"#],
            r.clone()
        ));
        assert!(!passes(
            &[r#"{"value":{"$or":[{"kind":["x"]},{"city":["Rome"]}]}}"#],
            r.clone()
        ));
        assert!(
            passes(&[r#"{"key":["k2"]}"#, r#"{"key":["k1"]}"#], r.clone()),
            "filters or'd"
        );
        assert!(passes(&[] as &[&str], r), "no filter passes all");
    }

    #[test]
    fn mistakes_are_named() {
        for (bad, says) in [
            ("[1]", "must be a JSON object"),
            ("{", "not JSON"),
            (r#"{"value":{"a":"x"}}"#, "value.a: a leaf must be an array"),
            (r#"{"value":{"a":[]}}"#, "matches nothing"),
            (
                r#"{"value":{"a":[{"regex":"x"}]}}"#,
                "unknown condition regex",
            ),
            (r#"{"value":{"a":[{"numeric":[">"]}]}}"#, "pairs"),
            (r#"{"value":{"a":[{"numeric":["~",1]}]}}"#, "operators"),
            (r#"{"value":{"a":[{"exists":"yes"}]}}"#, "true or false"),
            (r#"{"value":{"a":[[1]]}}"#, "do not nest"),
            (r#"{"value":{"$or":[{"a":[1]}]}}"#, "at least two"),
            (r#"{"value":{}}"#, "empty object"),
        ] {
            let e = Filter::parse(&[bad]).unwrap_err().to_string();
            assert!(
                e.starts_with("--filter: ") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[a-c]{0,3}".prop_map(Value::from),
            prop_oneof![
                Just("prefix"),
                Just("numeric"),
                Just("exists"),
                Just("anything-but"),
                Just("$or")
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("value".to_string()),
                        Just("prefix".to_string()),
                        Just("numeric".to_string()),
                        Just("exists".to_string()),
                        Just("anything-but".to_string()),
                        Just("$or".to_string()),
                        "[a-c]{1,2}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_pattern_parses_or_is_refused_and_matching_never_panics(pattern in json_value(), record in json_value()) {
            if let Ok(filter) = Filter::parse(&[pattern.to_string()]) {
                let _ = filter.matches(&record);
            }
        }
    }
}
