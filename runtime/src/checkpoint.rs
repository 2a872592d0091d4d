//! Checkpoints: named `f32` tensors in a safetensors file with metadata, written atomically.
//!
//! The metadata records the architecture name, a fingerprint string of the model's graph
//! (whatever the caller computes: it only has to change when the parameter layout can),
//! the epoch, the optimiser name, the tensor order and any extra key/value pairs. Loading a
//! checkpoint into a model checks the architecture, the fingerprint and every tensor's shape,
//! and explains a mismatch in one sentence.
//!
//! Writing is atomic: the bytes go to `<path>.tmp` in the same directory, the file is
//! fsynced, renamed over `path`, and the directory is fsynced, so a crash leaves either the
//! old checkpoint or the new one, never a torn file.
//!
//! This module is independent of any parameter container: tensors go in as
//! `(name, shape, data)` and come out as [`Tensor`]. By convention, optimiser state is stored
//! in the same file under the [`OPTIM_PREFIX`] namespace (see
//! `optim::Optimizer::export_state`); [`Checkpoint::check_model`] ignores that namespace.

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A named tensor: `(name, shape, row-major values)`.
pub type Tensor = (String, Vec<usize>, Vec<f32>);

/// Names starting with this are optimiser state, not model parameters.
pub const OPTIM_PREFIX: &str = "optim.";

const FORMAT_KEY: &str = "cnnc.format";
const FORMAT: &str = "cnnc-checkpoint-1";
const ARCH_KEY: &str = "cnnc.architecture";
const FP_KEY: &str = "cnnc.fingerprint";
const EPOCH_KEY: &str = "cnnc.epoch";
const OPT_KEY: &str = "cnnc.optimizer";
const ORDER_KEY: &str = "cnnc.order";
const EXTRA_PREFIX: &str = "x.";

/// Checkpoint errors; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An OS-level error reading or writing `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid (cnnc) safetensors checkpoint, or the tensors to save are invalid.
    #[error("{0}")]
    Format(String),
    /// The checkpoint does not fit the model (architecture, fingerprint, tensor set or shapes).
    #[error("{0}")]
    Mismatch(String),
}

fn io(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointMeta {
    /// Architecture name, e.g. `LeNet5`.
    pub architecture: String,
    /// Fingerprint of the model graph the tensors belong to.
    pub fingerprint: String,
    /// Epochs completed when saved.
    pub epoch: u64,
    /// Optimiser name (`SGD`, `Adam`, ...; empty if none).
    pub optimizer: String,
    /// Free-form extra metadata (e.g. the optimiser step count, the data normaliser).
    pub extra: BTreeMap<String, String>,
}

/// A loaded checkpoint: metadata and tensors in the order they were saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Where it was loaded from (for messages).
    pub path: PathBuf,
    /// Its metadata.
    pub meta: CheckpointMeta,
    /// Its tensors, in saved order.
    pub tensors: Vec<Tensor>,
}

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))
}

/// The temporary file `save` writes before renaming: `<path>.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Encodes the checkpoint bytes (no I/O).
pub fn encode<'a, I>(meta: &CheckpointMeta, tensors: I) -> Result<Vec<u8>, CheckpointError>
where
    I: IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
{
    let mut order = Vec::new();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut seen = HashSet::new();
    for (name, shape, data) in tensors {
        if name.is_empty() {
            return Err(CheckpointError::Format("cannot save a tensor with an empty name".into()));
        }
        if !seen.insert(name.to_string()) {
            return Err(CheckpointError::Format(format!("tensor {name} is given twice")));
        }
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(CheckpointError::Format(format!(
                "tensor {name} has shape {} but {} values",
                shape_str(shape),
                data.len()
            )));
        }
        order.push(name.to_string());
        bytes.push((name.to_string(), shape.to_vec(), data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let mut info = HashMap::new();
    info.insert(FORMAT_KEY.to_string(), FORMAT.to_string());
    info.insert(ARCH_KEY.to_string(), meta.architecture.clone());
    info.insert(FP_KEY.to_string(), meta.fingerprint.clone());
    info.insert(EPOCH_KEY.to_string(), meta.epoch.to_string());
    info.insert(OPT_KEY.to_string(), meta.optimizer.clone());
    info.insert(ORDER_KEY.to_string(), serde_json::to_string(&order).unwrap_or_default());
    for (k, v) in &meta.extra {
        info.insert(format!("{EXTRA_PREFIX}{k}"), v.clone());
    }
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| CheckpointError::Format(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(info))
        .map_err(|e| CheckpointError::Format(format!("cannot serialise checkpoint: {e}")))
}

/// Writes `bytes` to `path` atomically: `<path>.tmp`, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io(&dir, e))?;
    }
    Ok(())
}

/// Saves `tensors` (`(name, shape, values)`, names unique, `values.len()` = product of the
/// shape) with `meta` to `path`, atomically. On error the previous file at `path` is intact.
pub fn save<'a, I>(path: &Path, meta: &CheckpointMeta, tensors: I) -> Result<(), CheckpointError>
where
    I: IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
{
    let bytes = encode(meta, tensors)?;
    write_atomic(path, &bytes)
}

/// [`save`] for owned tensors.
pub fn save_tensors(path: &Path, meta: &CheckpointMeta, tensors: &[Tensor]) -> Result<(), CheckpointError> {
    save(path, meta, tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())))
}

fn decode_tensors(st: &SafeTensors<'_>, name: &str, order: Option<Vec<String>>) -> Result<Vec<Tensor>, CheckpointError> {
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    if let Some(order) = order {
        let a: HashSet<&String> = order.iter().collect();
        let b: HashSet<&String> = names.iter().collect();
        if a == b && order.len() == names.len() {
            names = order;
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let t = st
            .tensor(&n)
            .map_err(|e| CheckpointError::Format(format!("{name}: tensor {n}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(CheckpointError::Format(format!(
                "{name}: tensor {n} is {:?}, expected F32",
                t.dtype()
            )));
        }
        let data = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.push((n, t.shape().to_vec(), data));
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|e| io(path, e))
}

fn parse<'b>(bytes: &'b [u8], name: &str) -> Result<SafeTensors<'b>, CheckpointError> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        CheckpointError::Format(format!("{name}: not a valid safetensors file ({e}); truncated or corrupt?"))
    })
}

/// Loads every `f32` tensor of any safetensors file (no cnnc metadata needed), e.g. weights
/// exported from elsewhere; sorted by name unless the file records an order.
pub fn load_tensors(path: &Path) -> Result<Vec<Tensor>, CheckpointError> {
    let bytes = read(path)?;
    let name = path.display().to_string();
    let st = parse(&bytes, &name)?;
    let (_, md) = SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::Format(format!("{name}: {e}")))?;
    let order = md.metadata().as_ref().and_then(|m| m.get(ORDER_KEY)).and_then(|s| serde_json::from_str(s).ok());
    decode_tensors(&st, &name, order)
}

/// Loads a cnnc checkpoint (metadata and tensors), without checking it against a model.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = read(path)?;
    let name = path.display().to_string();
    let st = parse(&bytes, &name)?;
    let (_, md) = SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::Format(format!("{name}: {e}")))?;
    let empty = HashMap::new();
    let info = md.metadata().as_ref().unwrap_or(&empty);
    match info.get(FORMAT_KEY) {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(CheckpointError::Format(format!(
                "{name}: checkpoint format {f} is not supported (expected {FORMAT})"
            )))
        }
        None => {
            return Err(CheckpointError::Format(format!(
                "{name}: not a cnnc checkpoint (no {FORMAT_KEY} metadata); use load_tensors for plain safetensors"
            )))
        }
    }
    let get = |k: &str| info.get(k).cloned().unwrap_or_default();
    let epoch = get(EPOCH_KEY)
        .parse()
        .map_err(|_| CheckpointError::Format(format!("{name}: epoch metadata '{}' is not a number", get(EPOCH_KEY))))?;
    let extra = info
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(EXTRA_PREFIX).map(|k| (k.to_string(), v.clone())))
        .collect();
    let meta = CheckpointMeta {
        architecture: get(ARCH_KEY),
        fingerprint: get(FP_KEY),
        epoch,
        optimizer: get(OPT_KEY),
        extra,
    };
    let order = serde_json::from_str(&get(ORDER_KEY)).ok();
    let tensors = decode_tensors(&st, &name, order)?;
    Ok(Checkpoint { path: path.to_path_buf(), meta, tensors })
}

impl Checkpoint {
    /// Checks that this checkpoint belongs to the model `architecture` with graph
    /// `fingerprint` and parameter tensors `expected` (`(name, shape)`): same architecture and
    /// fingerprint, every expected tensor present with the same shape, and no other tensor
    /// outside the [`OPTIM_PREFIX`] namespace.
    pub fn check_model(&self, architecture: &str, fingerprint: &str, expected: &[(&str, &[usize])]) -> Result<(), CheckpointError> {
        let file = self.path.display();
        let m = &self.meta;
        if m.architecture != architecture {
            return Err(CheckpointError::Mismatch(format!(
                "checkpoint {file} was saved for {} (fingerprint {}) but the model is {architecture} (fingerprint {fingerprint})",
                m.architecture, m.fingerprint
            )));
        }
        if m.fingerprint != fingerprint {
            return Err(CheckpointError::Mismatch(format!(
                "checkpoint {file} was saved for {architecture} with graph fingerprint {} but the model's graph fingerprint is {fingerprint} (the architecture's definition changed)",
                m.fingerprint
            )));
        }
        let have: HashMap<&str, &Vec<usize>> = self.tensors.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
        for (name, shape) in expected {
            match have.get(name) {
                None => {
                    return Err(CheckpointError::Mismatch(format!(
                        "checkpoint {file}: tensor {name} of the model is missing from the checkpoint"
                    )))
                }
                Some(s) if s.as_slice() != *shape => {
                    return Err(CheckpointError::Mismatch(format!(
                        "checkpoint {file}: tensor {name} has shape {} in the checkpoint but {} in the model",
                        shape_str(s),
                        shape_str(shape)
                    )))
                }
                Some(_) => {}
            }
        }
        let want: HashSet<&str> = expected.iter().map(|(n, _)| *n).collect();
        if let Some((n, _, _)) =
            self.tensors.iter().find(|(n, _, _)| !n.starts_with(OPTIM_PREFIX) && !want.contains(n.as_str()))
        {
            return Err(CheckpointError::Mismatch(format!(
                "checkpoint {file}: tensor {n} is in the checkpoint but not in the model"
            )));
        }
        Ok(())
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _, _)| n == name)
    }

    /// The model tensors (outside [`OPTIM_PREFIX`]).
    pub fn model_tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.tensors.iter().filter(|(n, _, _)| !n.starts_with(OPTIM_PREFIX))
    }

    /// The optimiser tensors with [`OPTIM_PREFIX`] stripped from their names.
    pub fn optimizer_tensors(&self) -> Vec<Tensor> {
        self.tensors
            .iter()
            .filter_map(|(n, s, d)| n.strip_prefix(OPTIM_PREFIX).map(|k| (k.to_string(), s.clone(), d.clone())))
            .collect()
    }
}

/// [`load`] followed by [`Checkpoint::check_model`].
pub fn load_checked(
    path: &Path,
    architecture: &str,
    fingerprint: &str,
    expected: &[(&str, &[usize])],
) -> Result<Checkpoint, CheckpointError> {
    let c = load(path)?;
    c.check_model(architecture, fingerprint, expected)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<Tensor> {
        vec![
            ("conv1.weight".into(), vec![6, 1, 5, 5], (0..150).map(|i| i as f32 * 0.01 - 0.7).collect()),
            ("conv1.bias".into(), vec![6], vec![0.1, -0.2, 0.3, f32::MIN_POSITIVE, -0.0, 1e30]),
            ("fc.weight".into(), vec![10, 3], (0..30).map(|i| (i as f32).sin()).collect()),
        ]
    }

    fn meta() -> CheckpointMeta {
        let mut extra = BTreeMap::new();
        extra.insert("optim_step".into(), "1234".into());
        CheckpointMeta {
            architecture: "LeNet5".into(),
            fingerprint: "fp-abc".into(),
            epoch: 7,
            optimizer: "Adam".into(),
            extra,
        }
    }

    fn expected(t: &[Tensor]) -> Vec<(&str, &[usize])> {
        t.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect()
    }

    #[test]
    fn round_trip_keeps_order_values_and_metadata() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let mut t = model();
        t.push(("optim.conv1.bias.exp_avg".into(), vec![6], vec![1.0; 6]));
        save_tensors(&p, &meta(), &t).unwrap();
        assert!(!temp_path(&p).exists(), "no .tmp left behind");
        let c = load(&p).unwrap();
        assert_eq!(c.meta, meta());
        assert_eq!(c.tensors, t, "bit-exact, saved order");
        assert_eq!(c.optimizer_tensors(), vec![("conv1.bias.exp_avg".to_string(), vec![6], vec![1.0; 6])]);
        assert_eq!(c.model_tensors().count(), 3);
        let m = model();
        c.check_model("LeNet5", "fp-abc", &expected(&m)).unwrap();
        assert_eq!(load_tensors(&p).unwrap(), t);
        // Overwriting replaces the file.
        let mut m2 = meta();
        m2.epoch = 8;
        save_tensors(&p, &m2, &model()).unwrap();
        assert_eq!(load(&p).unwrap().meta.epoch, 8);
        assert_eq!(temp_path(&p).file_name().unwrap(), "x.safetensors.tmp");
    }

    #[test]
    fn mismatches_are_explained() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        save_tensors(&p, &meta(), &model()).unwrap();
        let name = p.display().to_string();
        let m = model();
        let e = load_checked(&p, "VggNet", "fp-vgg", &expected(&m)).unwrap_err().to_string();
        assert_eq!(e, format!("checkpoint {name} was saved for LeNet5 (fingerprint fp-abc) but the model is VggNet (fingerprint fp-vgg)"));
        let e = load_checked(&p, "LeNet5", "fp-new", &expected(&m)).unwrap_err().to_string();
        assert!(e.contains("graph fingerprint fp-abc but the model's graph fingerprint is fp-new"), "{e}");
        let mut wrong = expected(&m);
        let s = [8usize, 1, 5, 5];
        wrong[0].1 = &s;
        let e = load_checked(&p, "LeNet5", "fp-abc", &wrong).unwrap_err().to_string();
        assert_eq!(e, format!("checkpoint {name}: tensor conv1.weight has shape [6,1,5,5] in the checkpoint but [8,1,5,5] in the model"));
        let mut more = expected(&m);
        let s1 = [10usize];
        more.push(("fc.bias", &s1));
        let e = load_checked(&p, "LeNet5", "fp-abc", &more).unwrap_err().to_string();
        assert!(e.contains("tensor fc.bias of the model is missing"), "{e}");
        let fewer = &expected(&m)[..2];
        let e = load_checked(&p, "LeNet5", "fp-abc", fewer).unwrap_err().to_string();
        assert!(e.contains("tensor fc.weight is in the checkpoint but not in the model"), "{e}");
    }

    #[test]
    fn bad_files_and_bad_input_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        save_tensors(&p, &meta(), &model()).unwrap();
        let good = std::fs::read(&p).unwrap();
        // Truncated at many points: always an error, never a panic.
        for cut in [0, 3, 8, 20, good.len() / 2, good.len() - 1] {
            std::fs::write(&p, &good[..cut]).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains("x.safetensors"), "{e}");
        }
        // A valid safetensors file without cnnc metadata, and one with a non-f32 tensor.
        let raw = vec![0u8; 8];
        let v = TensorView::new(Dtype::U8, vec![8], &raw).unwrap();
        std::fs::write(&p, safetensors::serialize([("a", v)], None).unwrap()).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("not a cnnc checkpoint"));
        assert!(load_tensors(&p).unwrap_err().to_string().contains("tensor a is U8, expected F32"));
        // Invalid tensors to save: nothing is written, the old file stays.
        std::fs::write(&p, &good).unwrap();
        let bad: Vec<Tensor> = vec![("w".into(), vec![2, 3], vec![0.0; 5])];
        let e = save_tensors(&p, &meta(), &bad).unwrap_err().to_string();
        assert!(e.contains("tensor w has shape [2,3] but 5 values"), "{e}");
        let dup: Vec<Tensor> = vec![("w".into(), vec![1], vec![0.0]), ("w".into(), vec![1], vec![0.0])];
        assert!(save_tensors(&p, &meta(), &dup).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), good);
        // Unwritable target directory.
        let e = save_tensors(&d.path().join("no/such/dir/c.safetensors"), &meta(), &model()).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
        assert!(load(&d.path().join("missing.safetensors")).is_err());
    }
}
