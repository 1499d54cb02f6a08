//! Reading only the tensors a span needs from a model's safetensors files.
//!
//! Files are memory-mapped, so opening a 100 GB model costs nothing; a tensor is copied
//! into its own storage only when a span asks for it. [`Weights::loaded_bytes`] counts
//! those copies, which is how a span's memory is shown to scale with its size.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::gguf::{is_gguf, GgufFile};
use super::linear::Linear;
use super::{ChatTemplate, LlamaConfig, MeshTokenizer, ModelError, Quantization};

/// Where a model's weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Hugging Face safetensors beside a `config.json`.
    Safetensors,
    /// One llama.cpp GGUF file, its metadata standing in for `config.json`.
    Gguf,
}

/// A model directory as Hugging Face writes it: `config.json`, one or more
/// `*.safetensors` (sharded with `model.safetensors.index.json`), optional `tokenizer.json`;
/// or one GGUF file (`weight_files` is that file, `dir` the directory holding it).
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub weight_files: Vec<PathBuf>,
    pub format: WeightFormat,
}

impl ModelFiles {
    /// `path` is a model directory, a `.gguf` file, or a hub id found in the local HF
    /// cache. A directory with no `config.json` and exactly one `.gguf` file is that file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let path = &super::hub::resolve(path)?;
        if let Some(gguf) = gguf_in(path) {
            let config = GgufFile::open(&gguf)?.config()?;
            let dir = gguf.parent().map_or_else(PathBuf::new, Path::to_path_buf);
            return Ok(Self {
                dir,
                config,
                weight_files: vec![gguf],
                format: WeightFormat::Gguf,
            });
        }
        let config = LlamaConfig::from_dir(path)?;
        let weight_files = locate_weights(path)?;
        Ok(Self {
            dir: path.to_path_buf(),
            config,
            weight_files,
            format: WeightFormat::Safetensors,
        })
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// A GGUF file's bytes per block (its blocks are stored quantized); `None` for
    /// safetensors, whose size follows from the config and the dtype.
    pub fn gguf_block_bytes(&self) -> Option<u64> {
        match (self.format, self.weight_files.first()) {
            (WeightFormat::Gguf, Some(path)) => GgufFile::open(path).ok().map(|g| g.block_bytes()),
            _ => None,
        }
    }

    /// The model's tokenizer: `tokenizer.json` beside the weights, else the one a GGUF
    /// carries in its metadata (byte-level BPE only); `None` when there is neither.
    pub fn tokenizer(&self) -> Result<Option<MeshTokenizer>, ModelError> {
        let path = self.tokenizer_path();
        if path.exists() {
            return MeshTokenizer::from_file(&path).map(Some);
        }
        if let (WeightFormat::Gguf, Some(gguf)) = (self.format, self.weight_files.first()) {
            if let Some(json) = super::gguf_tokenizer::tokenizer_json(&GgufFile::open(gguf)?)? {
                return MeshTokenizer::from_json(&json).map(Some);
            }
        }
        Ok(None)
    }

    /// What a server of this model announces before loading a span: `gguf:<types>` of
    /// the file's blocks, else the on-load quantization (empty for full precision).
    pub fn announced_quantization(&self, quantize: Option<Quantization>) -> String {
        match (self.format, self.weight_files.first()) {
            (WeightFormat::Gguf, Some(path)) => GgufFile::open(path)
                .map(|g| g.block_formats())
                .unwrap_or_default(),
            _ => quantize.map(|q| q.name().to_string()).unwrap_or_default(),
        }
    }

    /// The model's chat template: a GGUF's `tokenizer.chat_template`, else the one in the
    /// directory (see [`ChatTemplate::from_model_dir`]).
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>, ModelError> {
        if let (WeightFormat::Gguf, Some(path)) = (self.format, self.weight_files.first()) {
            if let Some((source, bos, eos)) = GgufFile::open(path)?.chat_template() {
                return ChatTemplate::new(source, bos, eos).map(Some);
            }
        }
        ChatTemplate::from_model_dir(&self.dir)
    }

    /// Reads the header of every weight file and checks it against the file's length and
    /// against `config.json`: a file cut short, or a config claiming blocks the weights do
    /// not hold, is found here, before a node binds its ports or joins, instead of when a
    /// span loads (or, for a config claiming 100,000 blocks, never: the node would offer
    /// blocks it cannot load). Maps the files; reads only their headers.
    pub fn check_weights(&self) -> Result<(), ModelError> {
        let blocks = self.blocks_held()?;
        // Blocks 0..n, each with at least one tensor (a missing tensor inside a block is
        // named when the span loads).
        let found = (0u32..).take_while(|i| blocks.contains(i)).count();
        let found = u32::try_from(found).unwrap_or(u32::MAX);
        if usize::try_from(found).ok() != Some(self.config.num_hidden_layers) {
            return Err(ModelError::BlockCount {
                path: self.dir.join("config.json"),
                claimed: self.config.num_hidden_layers,
                found,
            });
        }
        Ok(())
    }
}

impl ModelFiles {
    /// The blocks the weight files hold at least one tensor of (a client's directory may
    /// hold only the embeddings and LM head). Maps the files; reads only their headers.
    pub fn blocks_held(&self) -> Result<BTreeSet<u32>, ModelError> {
        let mut blocks = BTreeSet::new();
        if self.format == WeightFormat::Gguf {
            for path in &self.weight_files {
                blocks.extend(GgufFile::open(path)?.block_indices());
            }
        }
        let safetensors = match self.format {
            WeightFormat::Safetensors => self.weight_files.as_slice(),
            WeightFormat::Gguf => &[],
        };
        for path in safetensors {
            // SAFETY: mapped read-only and dropped before returning; see `Weights::open`.
            let file = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                ModelError::BadSafetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            for (name, _) in file.tensors() {
                if let Some(i) = block_index(&name) {
                    blocks.insert(i);
                }
            }
        }
        Ok(blocks)
    }
}

/// The GGUF file `path` names: the file itself, or the only one in a directory without
/// `config.json`.
fn gguf_in(path: &Path) -> Option<PathBuf> {
    if is_gguf(path) && path.is_file() {
        return Some(path.to_path_buf());
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return None;
    }
    let mut found = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p));
    match (found.next(), found.next()) {
        (Some(one), None) => Some(one),
        _ => None,
    }
}

/// `i` of a tensor named `model.layers.{i}.…`.
fn block_index(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

fn locate_weights(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| ModelError::MalformedConfig {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        let mut files = Vec::with_capacity(shards.len());
        for shard in shards {
            // A shard name is a file in this directory, never a path elsewhere.
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(ModelError::MalformedConfig {
                    path: index_path.clone(),
                    reason: format!("shard name {shard:?} is not a plain file name"),
                });
            }
            files.push(dir.join(shard));
        }
        if files.is_empty() {
            return Err(ModelError::NoWeights(dir.to_path_buf()));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::NoWeights(dir.to_path_buf()));
    }
    Ok(files)
}

/// Parse a dtype name as used on the command line and in configs.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" | "half" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// Where a model's tensors come from.
enum Source {
    /// Memory-mapped safetensors files: a tensor is read when a span asks for it.
    Files(MmapedSafetensors),
    /// Tensors already made (random-weight models that are never written to disk).
    Memory(HashMap<String, Tensor>),
    /// A GGUF file, read a tensor at a time; quantized matrices stay quantized.
    Gguf {
        file: GgufFile,
        config: Box<LlamaConfig>,
        /// The quantized formats handed out so far, for [`Weights::format_label`].
        formats: std::cell::RefCell<BTreeSet<String>>,
    },
}

/// Lazily-read weights of one model, converted to `dtype` on `device` as they are taken.
pub struct Weights {
    tensors: Source,
    dtype: DType,
    device: Device,
    /// Projection matrices are quantized to this as they are taken (`None`: dense).
    quantize: Option<Quantization>,
    loaded_bytes: Cell<usize>,
}

impl Weights {
    pub fn open(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        if files.format == WeightFormat::Gguf {
            let path = files
                .weight_files
                .first()
                .ok_or_else(|| ModelError::NoWeights(files.dir.clone()))?;
            return Ok(Self {
                tensors: Source::Gguf {
                    file: GgufFile::open(path)?,
                    config: Box::new(files.config.clone()),
                    formats: Default::default(),
                },
                dtype,
                device: device.clone(),
                quantize: None,
                loaded_bytes: Cell::new(0),
            });
        }
        for path in &files.weight_files {
            if !path.exists() {
                return Err(ModelError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "weight shard"),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely
        // on nobody truncating a model file while a node is loading it.
        let tensors = unsafe { MmapedSafetensors::multi(&files.weight_files) }.map_err(|e| {
            ModelError::BadSafetensors {
                path: files.dir.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            tensors: Source::Files(tensors),
            dtype,
            device: device.clone(),
            quantize: None,
            loaded_bytes: Cell::new(0),
        })
    }

    /// Weights from tensors in memory, named as in a Hugging Face checkpoint; taken at
    /// `dtype` on `device` like file weights.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self {
            tensors: Source::Memory(tensors),
            dtype,
            device: device.clone(),
            quantize: None,
            loaded_bytes: Cell::new(0),
        }
    }

    /// Quantize projection matrices to `q` as they are taken; norms, embeddings and
    /// biases stay in the compute dtype.
    pub fn with_quantization(mut self, q: Option<Quantization>) -> Self {
        self.quantize = q;
        self
    }

    pub fn quantization(&self) -> Option<Quantization> {
        self.quantize
    }

    /// The announced form of the weights this source hands out: see
    /// [`super::SpanModel::quantization`].
    pub fn format_label(&self) -> Option<String> {
        if let Source::Gguf { formats, .. } = &self.tensors {
            let formats = formats.borrow();
            if formats.is_empty() {
                return None;
            }
            return Some(format!(
                "gguf:{}",
                formats.iter().cloned().collect::<Vec<_>>().join("+")
            ));
        }
        self.quantize.map(|q| q.name().to_string())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of tensor storage handed out so far.
    pub fn loaded_bytes(&self) -> usize {
        self.loaded_bytes.get()
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.tensors {
            Source::Files(files) => files.get(name).is_ok(),
            Source::Memory(map) => map.contains_key(name),
            Source::Gguf { file, .. } => file.contains(name),
        }
    }

    /// Take one tensor, checking its dtype and shape before copying it.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = self.take(name, shape, &self.device)?.to_dtype(self.dtype)?;
        self.count(tensor.elem_count() * self.dtype.size_in_bytes());
        Ok(tensor)
    }

    fn count(&self, bytes: usize) {
        self.loaded_bytes.set(self.loaded_bytes.get() + bytes);
    }

    /// The projection `{prefix}.weight` `[out_dim, in_dim]` (and `{prefix}.bias`), dense
    /// or quantized as these weights are set to.
    pub(crate) fn linear(
        &self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        if let Source::Gguf {
            file,
            config,
            formats,
        } = &self.tensors
        {
            let q = file.tensor(&name, &[out_dim, in_dim], config, &self.device)?;
            if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                self.count(q.storage_size_in_bytes());
                formats
                    .borrow_mut()
                    .insert(format!("{:?}", q.dtype()).to_ascii_lowercase());
                return Linear::quantized(q, bias);
            }
            let dense = q.dequantize(&self.device)?.to_dtype(self.dtype)?;
            self.count(dense.elem_count() * self.dtype.size_in_bytes());
            return Ok(Linear::dense(dense, bias));
        }
        match self.quantize.and_then(|q| q.ggml_for(in_dim)) {
            Some(format) => {
                // Quantized on the CPU (candle does so anyway) and only then moved to the
                // device, so the f32 matrix never takes device memory.
                let dense = self.take(&name, &[out_dim, in_dim], &Device::Cpu)?;
                let q = QTensor::quantize_onto(&dense.to_dtype(DType::F32)?, format, &self.device)?;
                self.count(q.storage_size_in_bytes());
                Linear::quantized(q, bias)
            }
            None => Ok(Linear::dense(self.get(&name, &[out_dim, in_dim])?, bias)),
        }
    }

    /// One tensor on `device` in its stored dtype, not counted.
    fn take(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor, ModelError> {
        let missing = || ModelError::MissingWeight {
            name: name.to_string(),
        };
        let tensor = match &self.tensors {
            Source::Files(files) => {
                Self::read(files.get(name).map_err(|_| missing())?, name, shape, device)?
            }
            Source::Memory(map) => {
                let t = map.get(name).ok_or_else(missing)?;
                if t.dims() != shape {
                    return Err(ModelError::WeightShape {
                        name: name.to_string(),
                        expected: shape.to_vec(),
                        actual: t.dims().to_vec(),
                    });
                }
                t.to_device(device)?
            }
            Source::Gguf { file, config, .. } => file
                .tensor(name, shape, config, device)?
                .dequantize(device)?,
        };
        Ok(tensor)
    }

    fn read(
        view: safetensors::tensor::TensorView<'_>,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        use candle_core::safetensors::Load;
        let stored = view.dtype();
        if !matches!(
            stored,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            return Err(ModelError::WeightDtype {
                name: name.to_string(),
                dtype: format!("{stored:?}"),
            });
        }
        if view.shape() != shape {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        Ok(view.load(device)?)
    }
}
