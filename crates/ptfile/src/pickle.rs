//! A restricted unpickler: it interprets the opcodes `torch.save` emits as pure data and never
//! imports or calls anything. `GLOBAL`/`REDUCE`/`NEWOBJ` become data, except for the handful of
//! torch rebuild functions that are recognised and decoded into tensor descriptions (and
//! TorchScript's `torch.jit._pickle.build_*list` wrappers, which return their argument).
//!
//! Everything lives in one arena addressed by `u32` ids, and `Value` is `Copy`: memo hits and
//! `DUP` are O(1), nesting never recurses (so deep or cyclic structures can't overflow the stack
//! when built or dropped), and strings are interned so dict keys compare by id. Every opcode adds
//! at most one arena object or stack slot, so memory stays proportional to the pickle's length.

use std::collections::HashMap;
use std::rc::Rc;

use crate::{show, Bad, DType};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (LONG1/LONG4); its value is not kept.
    BigInt,
    Float(f64),
    Str(u32),
    Ref(u32),
}

/// Hashable form of a dict key: strings by interned id, so lookups cost O(1) whatever their length.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    None,
    Bool(bool),
    Int(i64),
    Float(u64),
    Str(u32),
}

#[derive(Default)]
pub(crate) struct Dict {
    pub items: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

impl Dict {
    fn insert(&mut self, k: Value, v: Value) {
        let key = match k {
            Value::None => Some(Key::None),
            Value::Bool(b) => Some(Key::Bool(b)),
            Value::Int(i) => Some(Key::Int(i)),
            Value::Float(f) => Some(Key::Float(f.to_bits())),
            Value::Str(s) => Some(Key::Str(s)),
            Value::BigInt | Value::Ref(_) => None,
        };
        match key.and_then(|key| self.index.get(&key).copied()) {
            // Python keeps the first insertion's position and takes the last value.
            Some(i) => self.items[i].1 = v,
            None => {
                if let Some(key) = key {
                    self.index.insert(key, self.items.len());
                }
                self.items.push((k, v));
            }
        }
    }

    pub fn get_str(&self, strings: &Strings, name: &str) -> Option<Value> {
        let id = strings.lookup(name)?;
        self.index.get(&Key::Str(id)).map(|&i| self.items[i].1)
    }
}

/// A storage referenced through a persistent id: `('storage', type, key, location, numel)`.
pub(crate) struct Storage {
    /// `None` for `torch.UntypedStorage` (byte-addressed; the tensor carries the dtype).
    pub dtype: Option<DType>,
    pub key: String,
    pub numel: u64,
}

/// What `_rebuild_tensor*` describes: a strided view of a storage.
pub(crate) struct TensorRef {
    pub storage: u32,
    pub dtype: DType,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

pub(crate) enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Dict),
    /// Only the length is kept: torch checkpoints never need the contents.
    Bytes,
    Global {
        module: u32,
        name: u32,
    },
    Storage(Storage),
    Tensor(TensorRef),
    /// Anything else (`argparse.Namespace`, numpy scalars, TorchScript modules, ...): kept as
    /// inert data. `state` is what the first `BUILD` gave it (never applied, only recorded), so
    /// a TorchScript module's attributes (its submodules, parameters and ints such as a conv's
    /// stride) can be read back as plain data.
    Object {
        class: Value,
        state: Option<Value>,
    },
}

#[derive(Default)]
pub(crate) struct Strings {
    list: Vec<Rc<str>>,
    ids: HashMap<Rc<str>, u32>,
}

impl Strings {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.list.len() as u32;
        let rc: Rc<str> = Rc::from(s);
        self.list.push(rc.clone());
        self.ids.insert(rc, id);
        id
    }
    pub fn get(&self, id: u32) -> &str {
        &self.list[id as usize]
    }
    pub fn lookup(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

/// The result of unpickling: the root value and the arena it points into.
pub(crate) struct Pickle {
    pub objs: Vec<Obj>,
    pub strings: Strings,
    pub root: Value,
}

impl Pickle {
    pub fn obj(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Ref(id) => self.objs.get(id as usize),
            _ => None,
        }
    }

    /// `(module, name)` of a value that is a GLOBAL reference.
    pub fn global(&self, v: Value) -> Option<(&str, &str)> {
        match self.obj(v)? {
            Obj::Global { module, name } => {
                Some((self.strings.get(*module), self.strings.get(*name)))
            }
            _ => None,
        }
    }

    /// A short description of a value's kind, for error messages.
    pub fn describe(&self, v: Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Ref(_) => match self.obj(v) {
                Some(Obj::List(_)) => "a list".into(),
                Some(Obj::Tuple(_)) => "a tuple".into(),
                Some(Obj::Dict(_)) => "a dict".into(),
                Some(Obj::Bytes) => "bytes".into(),
                Some(Obj::Global { .. }) => "a class or function reference".into(),
                Some(Obj::Storage(_)) => "a storage".into(),
                Some(Obj::Tensor(_)) => "a tensor".into(),
                Some(Obj::Object { class, .. }) => match self.global(*class) {
                    Some((m, n)) => format!("a {}.{} object", show(m), show(n)),
                    None => "an object".into(),
                },
                None => "an invalid reference".into(),
            },
        }
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    strings: Strings,
}

/// Unpickles `data` (the archive's `data.pkl`).
pub(crate) fn load(data: &[u8]) -> Result<Pickle, Bad> {
    if data.len() > u32::MAX as usize {
        return Err(Bad::unsupported("data.pkl is larger than 4 GiB"));
    }
    let mut vm = Vm {
        data,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        strings: Strings::default(),
    };
    let root = vm.run()?;
    Ok(Pickle {
        objs: vm.objs,
        strings: vm.strings,
        root,
    })
}

impl Vm<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Bad {
        Bad::malformed(format!(
            "corrupt pickle data.pkl at offset {}: {msg}",
            self.op_at
        ))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Bad> {
        let data = self.data;
        match self.pos.checked_add(n).filter(|&end| end <= data.len()) {
            Some(end) => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "needs {n} bytes but only {} remain (truncated or corrupt pickle)",
                data.len() - self.pos
            ))),
        }
    }
    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Bad> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Bad> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Bad> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A length prefix, checked against the bytes that remain before anything is allocated.
    fn len_checked(&self, n: u64) -> Result<usize, Bad> {
        let remain = (self.data.len() - self.pos) as u64;
        if n > remain {
            return Err(self.err(format!(
                "length {n} exceeds the {remain} bytes that remain (truncated or corrupt pickle)"
            )));
        }
        Ok(n as usize)
    }
    fn line(&mut self) -> Result<String, Bad> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated GLOBAL line"))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.err("GLOBAL name is not UTF-8"))?
            .to_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: u64) -> Result<Value, Bad> {
        let n = self.len_checked(n)?;
        let data = self.data;
        let bytes = &data[self.pos..self.pos + n];
        let s = std::str::from_utf8(bytes).map_err(|_| self.err("string is not valid UTF-8"))?;
        self.pos += n;
        Ok(Value::Str(self.strings.intern(s)))
    }

    fn alloc(&mut self, o: Obj) -> Value {
        // Each opcode allocates at most one object and consumes at least one byte, so the arena
        // never outgrows the pickle (which is checked to fit in u32).
        let id = self.objs.len() as u32;
        self.objs.push(o);
        Value::Ref(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }
    fn pop(&mut self) -> Result<Value, Bad> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }
    fn top(&self) -> Result<Value, Bad> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        Ok(*self.stack.last().expect("checked non-empty"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, Bad> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(m))
    }
    fn obj_mut(&mut self, v: Value) -> Option<&mut Obj> {
        match v {
            Value::Ref(id) => self.objs.get_mut(id as usize),
            _ => None,
        }
    }
    fn obj(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Ref(id) => self.objs.get(id as usize),
            _ => None,
        }
    }
    fn memo_put(&mut self, idx: u32) -> Result<(), Bad> {
        let v = self.top()?;
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<(), Bad> {
        let v = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo key {idx} was never stored")))?;
        self.push(v);
        Ok(())
    }
    fn global_name(&self, v: Value) -> Option<(&str, &str)> {
        match self.obj(v)? {
            Obj::Global { module, name } => {
                Some((self.strings.get(*module), self.strings.get(*name)))
            }
            _ => None,
        }
    }
    fn tuple_items(&self, v: Value) -> Option<&[Value]> {
        match self.obj(v)? {
            Obj::Tuple(items) | Obj::List(items) => Some(items),
            _ => None,
        }
    }

    fn run(&mut self) -> Result<Value, Bad> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: only a read-ahead hint.
                    self.u64()?;
                }
                b'.' => return self.pop(), // STOP
                b'}' => {
                    let v = self.alloc(Obj::Dict(Dict::default()));
                    self.push(v);
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.push(v);
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()));
                    self.push(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'X' => {
                    let n = self.u32()?;
                    let v = self.string(u64::from(n))?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()?;
                    let v = self.string(u64::from(n))?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                    let n = match op {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len_checked(n)?;
                    self.take(n)?;
                    let v = self.alloc(Obj::Bytes);
                    self.push(v);
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a | 0x8b => {
                    // LONG1, LONG4: little-endian two's complement.
                    let n = if op == 0x8a {
                        u64::from(self.u8()?)
                    } else {
                        u64::from(self.u32()?)
                    };
                    let n = self.len_checked(n)?;
                    let b = self.take(n)?;
                    let v = if n == 0 {
                        Value::Int(0)
                    } else if n <= 8 {
                        let fill = if b[n - 1] & 0x80 != 0 { 0xFF } else { 0 };
                        let mut a = [fill; 8];
                        a[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(a))
                    } else {
                        Value::BigInt
                    };
                    self.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)));
                }
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'N' => self.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items));
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("DICT with an odd number of items"));
                    }
                    let mut d = Dict::default();
                    for kv in items.chunks_exact(2) {
                        d.insert(kv[0], kv[1]);
                    }
                    let v = self.alloc(Obj::Dict(d));
                    self.push(v);
                }
                0x8f => {
                    // EMPTY_SET: a list will do, nothing here needs set semantics.
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.push(v);
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items));
                    self.push(v);
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    self.extend(target, vec![item])?;
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.extend(target, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let target = self.top()?;
                    self.set_items(target, items)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(&module, &name);
                    self.push(v);
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let v = self.alloc(Obj::Global { module: m, name: n });
                    self.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args, 0)?;
                    self.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.new_object(class);
                    self.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.new_object(class);
                    self.push(v);
                }
                b'b' => {
                    // BUILD: `obj.__setstate__(state)` is never run; an inert object records
                    // its first state as data (a TorchScript module's attribute dict), every
                    // other target drops it. Storing a `Value` is O(1), so repeated BUILDs
                    // cannot amplify memory.
                    let state = self.pop()?;
                    let target = self.top()?;
                    if let Some(Obj::Object {
                        state: slot @ None, ..
                    }) = self.obj_mut(target)
                    {
                        *slot = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                _ => {
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{op:02x} (not one torch.save writes)"
                    )))
                }
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Value {
        let module = self.strings.intern(module);
        let name = self.strings.intern(name);
        self.alloc(Obj::Global { module, name })
    }

    fn extend(&mut self, target: Value, items: Vec<Value>) -> Result<(), Bad> {
        match self.obj_mut(target) {
            Some(Obj::List(list)) => {
                list.extend(items);
                Ok(())
            }
            // A list subclass we don't model: its items are not needed.
            Some(Obj::Object { .. }) => Ok(()),
            _ => Err(self.err("APPEND to something that is not a list")),
        }
    }

    fn set_items(&mut self, target: Value, items: Vec<Value>) -> Result<(), Bad> {
        match self.obj_mut(target) {
            Some(Obj::Dict(d)) => {
                for kv in items.chunks_exact(2) {
                    d.insert(kv[0], kv[1]);
                }
                Ok(())
            }
            Some(Obj::Object { .. }) => Ok(()),
            _ => Err(self.err("SETITEM on something that is not a dict")),
        }
    }

    fn new_object(&mut self, class: Value) -> Value {
        if let Some((m, n)) = self.global_name(class) {
            if is_dict_class(m, n) {
                return self.alloc(Obj::Dict(Dict::default()));
            }
        }
        self.alloc(Obj::Object { class, state: None })
    }

    /// REDUCE: `func(*args)`, evaluated only for the known torch rebuild functions and dict
    /// constructors; every other call becomes an inert object.
    fn call(&mut self, func: Value, args: Value, depth: u32) -> Result<Value, Bad> {
        let Some((m, n)) = self.global_name(func) else {
            return Ok(self.alloc(Obj::Object {
                class: func,
                state: None,
            }));
        };
        let known = matches!(
            (m, n),
            (
                "torch._utils",
                "_rebuild_tensor_v2"
                    | "_rebuild_tensor"
                    | "_rebuild_tensor_v3"
                    | "_rebuild_parameter"
                    | "_rebuild_parameter_with_state"
            ) | ("torch._tensor", "_rebuild_from_type_v2")
                | ("torch", "Size")
        );
        if m == "torch.jit._pickle"
            && matches!(
                n,
                "build_intlist"
                    | "build_doublelist"
                    | "build_boollist"
                    | "build_tensorlist"
                    | "restore_type_tag"
            )
        {
            // TorchScript wraps typed lists (`List[int]` attributes such as a conv's padding) and
            // type-tagged values in these helpers; each returns its first argument unchanged.
            return match self.tuple_items(args).and_then(|a| a.first().copied()) {
                Some(v) => Ok(v),
                None => Err(self.err(format!("{m}.{n} without an argument"))),
            };
        }
        if is_dict_class(m, n) {
            // OrderedDict.__reduce__ gives `OrderedDict()` followed by SETITEMS; the items are
            // never passed as arguments, so they need not be read (no work for a hostile arg).
            return Ok(self.alloc(Obj::Dict(Dict::default())));
        }
        if !known {
            return Ok(self.alloc(Obj::Object {
                class: func,
                state: None,
            }));
        }
        let (m, n) = (m.to_owned(), n.to_owned());
        // Only the first few arguments are ever used: copying at most 8 keeps a REDUCE O(1) even
        // when a memoized huge tuple is passed again and again.
        let Some(argv) = self
            .tuple_items(args)
            .map(|a| a.iter().take(8).copied().collect::<Vec<_>>())
        else {
            return Err(self.err(format!("REDUCE of {m}.{n} with non-tuple arguments")));
        };
        match n.as_str() {
            "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3" => {
                self.rebuild_tensor(&n, &argv)
            }
            "_rebuild_parameter" | "_rebuild_parameter_with_state" => match argv.first() {
                Some(&t) if matches!(self.obj(t), Some(Obj::Tensor(_))) => Ok(t),
                _ => Err(self.err(format!("{n} without a tensor argument"))),
            },
            "_rebuild_from_type_v2" if depth < 4 => {
                // (func, new_type, args, state): a tensor subclass; keep the plain tensor.
                match argv.as_slice() {
                    [f, _, a, ..] => self.call(*f, *a, depth + 1),
                    _ => Err(self.err("_rebuild_from_type_v2 with too few arguments")),
                }
            }
            "Size" => match argv.first() {
                Some(&t) => Ok(t),
                None => Err(self.err("torch.Size without arguments")),
            },
            _ => Ok(self.alloc(Obj::Object {
                class: func,
                state: None,
            })),
        }
    }

    fn int_arg(&self, v: Value, what: &str) -> Result<u64, Bad> {
        match v {
            Value::Int(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.err(format!("tensor {what} must be a non-negative int"))),
        }
    }

    fn int_tuple(&self, v: Value, what: &str) -> Result<Vec<u64>, Bad> {
        let items = self
            .tuple_items(v)
            .ok_or_else(|| self.err(format!("tensor {what} must be a tuple")))?;
        if items.len() > MAX_DIMS {
            return Err(self.err(format!(
                "tensor has {} dimensions (at most {MAX_DIMS} supported)",
                items.len()
            )));
        }
        items.iter().map(|&i| self.int_arg(i, what)).collect()
    }

    fn rebuild_tensor(&mut self, func: &str, argv: &[Value]) -> Result<Value, Bad> {
        if argv.len() < 4 {
            return Err(self.err(format!("{func} with {} arguments", argv.len())));
        }
        let (storage, st) = match argv[0] {
            Value::Ref(id) => match self.objs.get(id as usize) {
                Some(Obj::Storage(st)) => (id, st),
                _ => return Err(self.err(format!("{func}: first argument is not a storage"))),
            },
            _ => return Err(self.err(format!("{func}: first argument is not a storage"))),
        };
        let dtype = if func == "_rebuild_tensor_v3" {
            let d = argv
                .get(6)
                .copied()
                .ok_or_else(|| self.err("_rebuild_tensor_v3 without a dtype"))?;
            match self.global_name(d) {
                Some(("torch", name)) => DType::from_torch_name(name).ok_or_else(|| {
                    Bad::unsupported(format!(
                        "tensor dtype torch.{} is not supported",
                        show(name)
                    ))
                })?,
                _ => return Err(self.err("_rebuild_tensor_v3 dtype is not a torch dtype")),
            }
        } else {
            st.dtype.unwrap_or(DType::U8)
        };
        let offset = self.int_arg(argv[1], "storage offset")?;
        let shape = self.int_tuple(argv[2], "size")?;
        let stride = self.int_tuple(argv[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "tensor has {} sizes but {} strides",
                shape.len(),
                stride.len()
            )));
        }
        Ok(self.alloc(Obj::Tensor(TensorRef {
            storage,
            dtype,
            offset,
            shape,
            stride,
        })))
    }

    fn persistent_load(&mut self, pid: Value) -> Result<Value, Bad> {
        let items = self
            .tuple_items(pid)
            .ok_or_else(|| self.err("persistent id is not a tuple"))?;
        let [tag, ty, key, _location, numel] = items else {
            return Err(self.err(format!(
                "persistent id has {} fields, expected ('storage', type, key, location, numel)",
                items.len()
            )));
        };
        if !matches!(tag, Value::Str(s) if self.strings.get(*s) == "storage") {
            return Err(self.err("persistent id is not a ('storage', ...) tuple"));
        }
        let dtype = match self.global_name(*ty) {
            Some(("torch" | "torch.cuda" | "torch.storage", name)) => {
                if name == "UntypedStorage" {
                    None
                } else {
                    Some(DType::from_storage_name(name).ok_or_else(|| {
                        Bad::unsupported(format!(
                            "storage type torch.{} is not supported (quantized or unknown)",
                            show(name)
                        ))
                    })?)
                }
            }
            Some((m, n)) => {
                return Err(Bad::unsupported(format!(
                    "storage type {}.{} is not supported",
                    show(m),
                    show(n)
                )))
            }
            None => return Err(self.err("storage type is not a class reference")),
        };
        let key = match *key {
            Value::Str(s) => self.strings.get(s).to_owned(),
            Value::Int(i) => i.to_string(),
            _ => return Err(self.err("storage key is not a string")),
        };
        if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
            return Err(self.err(format!("storage key '{}' is not a plain name", show(&key))));
        }
        let numel = self.int_arg(*numel, "storage size")?;
        Ok(self.alloc(Obj::Storage(Storage { dtype, key, numel })))
    }
}

/// Far more dimensions than any real tensor has; the cap keeps a memoized huge tuple from being
/// copied into every tensor that names it.
const MAX_DIMS: usize = 64;

fn is_dict_class(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict" | "defaultdict") | ("builtins" | "__builtin__", "dict")
    )
}
