//! [`TensorDict`]: an ordered map from string keys to tensors or plain values.

use super::codec::MetadataEntry;
use super::Tensor;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use std::cell::Cell;

/// Deepest nesting of lists and maps a [`Value`] may have when decoded.
///
/// Decoding recurses once per level; the cap keeps bytes from a peer from
/// exhausting the stack.
pub const MAX_VALUE_DEPTH: u32 = 64;

/// A plain (non-tensor) value in a [`TensorDict`]: what the seed carries as
/// arbitrary picklable Python objects, restricted to data.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub enum Value {
    /// Python's `None`.
    #[default]
    None,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<Value>),
    /// A map with ordered keys.
    Map(Vec<(String, Value)>),
}

// Mirror of `Value` with the same serde shape: `Value`'s own `Deserialize`
// wraps it with a depth guard.
#[derive(Deserialize)]
#[serde(rename = "Value")]
enum ValueRepr {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(Vec<(String, Value)>),
}

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

struct DepthGuard;

impl DepthGuard {
    fn enter() -> Option<DepthGuard> {
        DEPTH.with(|d| {
            if d.get() >= MAX_VALUE_DEPTH {
                None
            } else {
                d.set(d.get() + 1);
                Some(DepthGuard)
            }
        })
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let _guard = DepthGuard::enter()
            .ok_or_else(|| D::Error::custom(format!("value nested deeper than {MAX_VALUE_DEPTH} levels")))?;
        Ok(match ValueRepr::deserialize(d)? {
            ValueRepr::None => Value::None,
            ValueRepr::Bool(b) => Value::Bool(b),
            ValueRepr::Int(i) => Value::Int(i),
            ValueRepr::Float(f) => Value::Float(f),
            ValueRepr::Str(s) => Value::Str(s),
            ValueRepr::List(l) => Value::List(l),
            ValueRepr::Map(m) => Value::Map(m),
        })
    }
}

impl Value {
    /// True for [`Value::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }
    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// The float, if this is one (integers are not converted).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The list, if this is one.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
    /// The map entries, if this is a map.
    pub fn as_map(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    /// The value at `key`, if this is a map holding it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_map()?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

macro_rules! value_from {
    ($($t:ty => |$x:ident| $e:expr),* $(,)?) => {
        $(impl From<$t> for Value {
            fn from($x: $t) -> Value { $e }
        }
        impl From<$t> for TensorDictValue {
            fn from($x: $t) -> TensorDictValue { TensorDictValue::Value($e) }
        })*
    };
}

value_from!(
    () => |_x| Value::None,
    bool => |x| Value::Bool(x),
    i64 => |x| Value::Int(x),
    i32 => |x| Value::Int(x as i64),
    u32 => |x| Value::Int(x as i64),
    f64 => |x| Value::Float(x),
    f32 => |x| Value::Float(x as f64),
    &str => |x| Value::Str(x.to_string()),
    String => |x| Value::Str(x),
    Vec<Value> => |x| Value::List(x),
    Vec<(String, Value)> => |x| Value::Map(x),
);

/// One entry of a [`TensorDict`]: a tensor or a plain value.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorDictValue {
    /// A tensor; sent as metadata plus its bytes.
    Tensor(Tensor),
    /// Anything else; sent inside the metadata.
    Value(Value),
}

impl TensorDictValue {
    /// The tensor, if this entry is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            TensorDictValue::Tensor(t) => Some(t),
            TensorDictValue::Value(_) => None,
        }
    }
    /// The value, if this entry is not a tensor.
    pub fn as_value(&self) -> Option<&Value> {
        match self {
            TensorDictValue::Value(v) => Some(v),
            TensorDictValue::Tensor(_) => None,
        }
    }
}

impl From<Tensor> for TensorDictValue {
    fn from(t: Tensor) -> Self {
        TensorDictValue::Tensor(t)
    }
}

impl From<Value> for TensorDictValue {
    fn from(v: Value) -> Self {
        TensorDictValue::Value(v)
    }
}

/// An ordered map from string keys to tensors or plain values: the seed's
/// `Dict[str, Union[torch.Tensor, Any]]`. Keys keep insertion order, which
/// is the order the tensors travel in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorDict {
    entries: Vec<(String, TensorDictValue)>,
}

impl TensorDict {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key`; an existing key keeps its position. Returns the old value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<TensorDictValue>) -> Option<TensorDictValue> {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }

    /// Builder form of [`TensorDict::insert`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<TensorDictValue>) -> Self {
        self.insert(key, value);
        self
    }

    /// The entry at `key`.
    pub fn get(&self, key: &str) -> Option<&TensorDictValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// The tensor at `key`, if there is one.
    pub fn get_tensor(&self, key: &str) -> Option<&Tensor> {
        self.get(key)?.as_tensor()
    }
    /// The plain value at `key`, if there is one.
    pub fn get_value(&self, key: &str) -> Option<&Value> {
        self.get(key)?.as_value()
    }
    /// True if `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// Removes `key`, keeping the order of the rest.
    pub fn remove(&mut self, key: &str) -> Option<TensorDictValue> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorDictValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Entries in order, values mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut TensorDictValue)> {
        self.entries.iter_mut().map(|(k, v)| (k.as_str(), v))
    }
    /// The tensors in order.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.entries.iter().filter_map(|(_, v)| v.as_tensor())
    }

    /// The seed's `_split_tensor_dict`: every entry with tensors replaced by
    /// their metadata, plus the tensors in order.
    pub fn split(&self) -> (Vec<(String, MetadataEntry)>, Vec<&Tensor>) {
        let mut meta = Vec::with_capacity(self.entries.len());
        let mut tensors = Vec::new();
        for (k, v) in &self.entries {
            match v {
                TensorDictValue::Tensor(t) => {
                    meta.push((k.clone(), MetadataEntry::Tensor(t.metadata())));
                    tensors.push(t);
                }
                TensorDictValue::Value(v) => meta.push((k.clone(), MetadataEntry::Value(v.clone()))),
            }
        }
        (meta, tensors)
    }

    /// The entries, consuming the dict.
    pub fn into_entries(self) -> Vec<(String, TensorDictValue)> {
        self.entries
    }
}

impl<K: Into<String>, V: Into<TensorDictValue>> FromIterator<(K, V)> for TensorDict {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut d = TensorDict::new();
        for (k, v) in iter {
            d.insert(k, v);
        }
        d
    }
}

impl IntoIterator for TensorDict {
    type Item = (String, TensorDictValue);
    type IntoIter = std::vec::IntoIter<(String, TensorDictValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_keeps_order_and_replaces_in_place() {
        let mut d = TensorDict::new();
        d.insert("a", 1i64);
        d.insert("t", Tensor::vec1(&[1.0f32]));
        d.insert("b", "x");
        assert_eq!(d.insert("a", 2i64), Some(TensorDictValue::Value(Value::Int(1))));
        assert_eq!(d.keys().collect::<Vec<_>>(), ["a", "t", "b"]);
        assert_eq!(d.get_value("a"), Some(&Value::Int(2)));
        assert!(d.get_tensor("a").is_none());
        assert_eq!(d.get_tensor("t").unwrap().shape(), &[1]);
        let (meta, tensors) = d.split();
        assert_eq!(meta.len(), 3);
        assert_eq!(tensors.len(), 1);
        assert!(matches!(meta[1].1, MetadataEntry::Tensor(_)));
        assert!(d.remove("t").is_some());
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn value_accessors() {
        let v = Value::Map(vec![("k".into(), Value::List(vec![1i64.into(), "s".into(), ().into()]))]);
        assert_eq!(v.get("k").unwrap().as_list().unwrap()[1].as_str(), Some("s"));
        assert!(v.get("k").unwrap().as_list().unwrap()[2].is_none());
        assert_eq!(Value::from(1.5f32).as_float(), Some(1.5));
        assert_eq!(Value::from(true).as_bool(), Some(true));
        assert_eq!(Value::from(3i32).as_int(), Some(3));
    }

    #[test]
    fn deep_values_are_refused_not_overflowed() {
        let mut v = Value::Int(1);
        for _ in 0..(MAX_VALUE_DEPTH - 1) {
            v = Value::List(vec![v]);
        }
        let bytes = postcard::to_allocvec(&v).unwrap();
        assert_eq!(postcard::from_bytes::<Value>(&bytes).unwrap(), v);
        let deeper = Value::List(vec![v]);
        let bytes = postcard::to_allocvec(&deeper).unwrap();
        assert!(postcard::from_bytes::<Value>(&bytes).is_err());
        // A hostile prefix that claims a million nested one-element lists.
        let hostile: Vec<u8> = std::iter::repeat([5u8, 1u8]).take(1_000_000).flatten().collect();
        assert!(postcard::from_bytes::<Value>(&hostile).is_err());
        // The depth counter is back to zero after errors.
        assert_eq!(
            postcard::from_bytes::<Value>(&postcard::to_allocvec(&Value::Int(3)).unwrap()).unwrap(),
            Value::Int(3)
        );
    }
}
