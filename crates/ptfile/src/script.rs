//! TorchScript archives (`torch.jit.save`) read as data.
//!
//! A TorchScript archive has the same zip layout as a `torch.save` checkpoint (`<name>/data.pkl`
//! plus `<name>/data/<key>` storages), but its pickle is not a dict of tensors: the root is a
//! `__torch__.<Class>` module object built with `NEWOBJ` and given its attributes through `BUILD`
//! (a dict of submodules, parameters, buffers and plain values such as a conv's stride). The
//! restricted unpickler never runs `__setstate__`; it records each inert object's state as data,
//! and this module walks those states, so the weights *and* the integer attributes the
//! TorchScript `code/` reads (`self.stride`, `self.padding`) come back without executing anything.

use std::collections::HashSet;

use crate::pickle::{Obj, Pickle, TensorRef, Value};
use crate::zip::{BytesSource, FileSource, Source};
use crate::{show, with_pickle, Bad, PtError, RawTensor, EXPANSION_LIMIT};

/// A plain (non-tensor, non-module) attribute of a TorchScript module.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Attr {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A list or tuple of ints (`padding: List[int]`, kernel sizes, ...).
    Ints(Vec<i64>),
}

/// What a TorchScript archive holds, flattened with '.' along attribute names from the root
/// module (`net.layers.conv.weight`), in the pickle's order.
#[derive(Clone, Debug)]
pub struct ScriptModule {
    /// Qualified class of the root module, e.g. `__torch__.wrap_net.WrapNet`.
    pub class: String,
    /// Parameters and buffers.
    pub tensors: Vec<(String, RawTensor)>,
    /// Plain attributes (`training`, `stride`, `padding`, ...).
    pub attributes: Vec<(String, Attr)>,
    /// Every submodule's path and qualified class (`net.layers.conv` →
    /// `__torch__.inceptionv3.Conv2dLayer`); the root is not listed.
    pub submodules: Vec<(String, String)>,
}

impl ScriptModule {
    /// Looks a tensor up by its dotted path (linear scan).
    pub fn tensor(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Looks a plain attribute up by its dotted path (linear scan).
    pub fn attribute(&self, name: &str) -> Option<&Attr> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }
}

/// Reads a TorchScript archive's module tree (see the module docs). Fails with
/// [`PtError::Unsupported`] for a plain `torch.save` checkpoint (use [`crate::read_pt`]).
pub fn read_torchscript(path: &std::path::Path) -> Result<ScriptModule, PtError> {
    let name = path.display().to_string();
    let io_err = |context: &str, source| PtError::Io {
        file: name.clone(),
        context: context.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| io_err("opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err("reading metadata", e))?
        .len();
    load(&FileSource { file, len }).map_err(|b| b.named(&name))
}

/// [`read_torchscript`] on bytes already in memory; `name_for_errors` prefixes every error.
pub fn read_torchscript_bytes(
    bytes: &[u8],
    name_for_errors: &str,
) -> Result<ScriptModule, PtError> {
    load(&BytesSource(bytes)).map_err(|b| b.named(name_for_errors))
}

/// Module nesting deeper than this is treated as corrupt (real models nest a handful of levels;
/// the cap keeps the walk's explicit stack small for hostile input).
const MAX_DEPTH: usize = 64;

fn load(src: &dyn Source) -> Result<ScriptModule, Bad> {
    with_pickle(src, |store, p, name_budget, is_torchscript| {
        let class = match p.obj(p.root) {
            Some(Obj::Object { class, .. }) => p.global(*class).map(|(m, n)| format!("{m}.{n}")),
            _ => None,
        };
        let class = match class {
            Some(c) if c.starts_with("__torch__.") => c,
            _ => {
                return Err(if is_torchscript {
                    Bad::malformed(format!(
                        "TorchScript archive whose root is {}, not a __torch__ module",
                        p.describe(p.root)
                    ))
                } else {
                    Bad::unsupported(
                        "not a TorchScript archive (no constants.pkl, root is not a __torch__ \
                         module); read it with ptfile::read_pt",
                    )
                })
            }
        };
        let mut walk = Walk {
            p,
            budget: name_budget,
            tensors: Vec::new(),
            attributes: Vec::new(),
            submodules: Vec::new(),
        };
        walk.module(p.root)?;
        let mut budget = src.len().saturating_mul(EXPANSION_LIMIT);
        let mut tensors = Vec::with_capacity(walk.tensors.len());
        let mut names = HashSet::new();
        for (name, t) in walk.tensors {
            if !names.insert(name.clone()) {
                return Err(Bad::malformed(format!(
                    "tensor name '{}' appears twice",
                    show(&name)
                )));
            }
            let raw = store.tensor(p, &name, t, &mut budget)?;
            tensors.push((name, raw));
        }
        Ok(ScriptModule {
            class,
            tensors,
            attributes: walk.attributes,
            submodules: walk.submodules,
        })
    })
}

/// Depth-first walk over module states. Work is bounded by `budget`: every attribute visited
/// costs its full dotted name's length, so shared submodules (a DAG) cannot blow up, and a module
/// that (through a corrupt pickle) contains itself is rejected via the ancestor check.
struct Walk<'p> {
    p: &'p Pickle,
    budget: u64,
    tensors: Vec<(String, &'p TensorRef)>,
    attributes: Vec<(String, Attr)>,
    submodules: Vec<(String, String)>,
}

impl<'p> Walk<'p> {
    fn module(&mut self, root: Value) -> Result<(), Bad> {
        // Explicit stack of (module value, path, depth) so deep nesting cannot overflow ours.
        let mut stack: Vec<(Value, String, Vec<u32>)> = vec![(root, String::new(), Vec::new())];
        while let Some((v, path, ancestors)) = stack.pop() {
            let Value::Ref(id) = v else { continue };
            if ancestors.contains(&id) {
                return Err(Bad::malformed(format!(
                    "module '{}' contains itself",
                    show(&path)
                )));
            }
            if ancestors.len() >= MAX_DEPTH {
                return Err(Bad::malformed(format!(
                    "modules nest deeper than {MAX_DEPTH} levels at '{}'",
                    show(&path)
                )));
            }
            let Some(Obj::Object { state, .. }) = self.p.objs.get(id as usize) else {
                continue;
            };
            let Some(Obj::Dict(d)) = state.and_then(|s| self.p.obj(s)) else {
                // A module with no attribute dict (scripted modules always have one): nothing
                // to read.
                continue;
            };
            let mut children = Vec::new();
            for &(k, val) in &d.items {
                let Value::Str(k) = k else { continue };
                let key = self.p.strings.get(k);
                // A list attribute is copied out, so its length is charged too: a memoized huge
                // list named by many attributes cannot turn into quadratic work.
                let list_len = match self.p.obj(val) {
                    Some(Obj::List(items) | Obj::Tuple(items)) => items.len(),
                    _ => 0,
                };
                let cost = (path.len() + key.len() + list_len) as u64 + 1;
                if cost > self.budget {
                    return Err(Bad::malformed(
                        "attribute names are far longer than the pickle could hold (corrupt file)",
                    ));
                }
                self.budget -= cost;
                let name = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(attr) = self.plain(val) {
                    self.attributes.push((name, attr));
                    continue;
                }
                let p: &'p Pickle = self.p;
                match p.obj(val) {
                    Some(Obj::Tensor(t)) => self.tensors.push((name, t)),
                    Some(Obj::Object { class, .. }) => {
                        if let Some((m, n)) = self.p.global(*class) {
                            if m.starts_with("__torch__") {
                                self.submodules.push((name.clone(), format!("{m}.{n}")));
                                children.push((val, name));
                            }
                        }
                    }
                    _ => {}
                }
            }
            // Reverse so that children are visited in attribute order.
            for (val, name) in children.into_iter().rev() {
                let mut anc = ancestors.clone();
                anc.push(id);
                stack.push((val, name, anc));
            }
        }
        Ok(())
    }

    fn plain(&self, v: Value) -> Option<Attr> {
        Some(match v {
            Value::None => Attr::None,
            Value::Bool(b) => Attr::Bool(b),
            Value::Int(i) => Attr::Int(i),
            Value::Float(f) => Attr::Float(f),
            Value::Str(s) => Attr::Str(self.p.strings.get(s).to_owned()),
            Value::BigInt => return None,
            Value::Ref(_) => match self.p.obj(v)? {
                Obj::List(items) | Obj::Tuple(items) => {
                    let ints: Option<Vec<i64>> = items
                        .iter()
                        .map(|x| match x {
                            Value::Int(i) => Some(*i),
                            _ => None,
                        })
                        .collect();
                    Attr::Ints(ints?)
                }
                _ => return None,
            },
        })
    }
}
