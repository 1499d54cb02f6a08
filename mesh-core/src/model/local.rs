//! A whole model split into spans inside one process: the reference the mesh must match.

use std::path::Path;

use candle_core::{DType, Device};

use super::{
    ClientHead, FinishReason, Generation, MeshTokenizer, ModelError, ModelFiles, Quantization,
    SamplingParams, SpanModel, TextStream,
};
use crate::types::BlockRange;

/// Head plus every span, run in order in this process.
#[derive(Debug)]
pub struct LocalModel {
    files: ModelFiles,
    head: ClientHead,
    spans: Vec<SpanModel>,
    tokenizer: Option<MeshTokenizer>,
}

/// What a finished generation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOutput {
    pub text: String,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

impl LocalModel {
    /// Load the model in `dir` as the given contiguous spans (which must cover every block).
    pub fn load_spans(
        dir: &Path,
        ranges: &[BlockRange],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_spans_quantized(dir, ranges, dtype, None, device)
    }

    /// [`LocalModel::load_spans`] with the spans' projections quantized to `quantize` on
    /// load (the head stays at `dtype`).
    pub fn load_spans_quantized(
        dir: &Path,
        ranges: &[BlockRange],
        dtype: DType,
        quantize: Option<Quantization>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let files = ModelFiles::open(dir)?;
        let num_blocks = files.config.num_blocks();
        let mut expected_start = 0;
        for r in ranges {
            if r.start != expected_start || !r.fits(num_blocks) {
                return Err(ModelError::SpanOutOfRange {
                    span: *r,
                    num_blocks,
                });
            }
            expected_start = r.end;
        }
        if expected_start != num_blocks {
            return Err(ModelError::SpanOutOfRange {
                span: BlockRange::new(expected_start, num_blocks),
                num_blocks,
            });
        }
        let head = ClientHead::load(&files, dtype, device)?;
        let spans = ranges
            .iter()
            .map(|r| SpanModel::load_quantized(&files, *r, dtype, quantize, device))
            .collect::<Result<Vec<_>, _>>()?;
        let tokenizer = files.tokenizer()?;
        Ok(Self {
            files,
            head,
            spans,
            tokenizer,
        })
    }

    /// Load the model in f32 split into `parts` near-equal spans.
    pub fn load_split(dir: &Path, parts: u32, device: &Device) -> Result<Self, ModelError> {
        let num_blocks = ModelFiles::open(dir)?.config.num_blocks();
        Self::load_spans(
            dir,
            &BlockRange::even_split(num_blocks, parts),
            DType::F32,
            device,
        )
    }

    pub fn head(&self) -> &ClientHead {
        &self.head
    }

    pub fn spans(&self) -> &[SpanModel] {
        &self.spans
    }

    pub fn tokenizer(&self) -> Option<&MeshTokenizer> {
        self.tokenizer.as_ref()
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// Generate from token ids; `on_token` sees each new id as it is chosen.
    pub fn generate_ids(
        &self,
        prompt: Vec<u32>,
        params: &SamplingParams,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation, ModelError> {
        let max_context = self.files.config.max_position_embeddings;
        let mut generation = Generation::new(prompt, params.clone(), max_context)?;
        let mut caches = self
            .spans
            .iter()
            .map(|s| s.new_cache(max_context))
            .collect::<Result<Vec<_>, _>>()?;
        while let Some((input, start)) = generation.next_input() {
            let mut hidden = self.head.embed(input)?;
            for (span, cache) in self.spans.iter().zip(caches.iter_mut()) {
                hidden = span.forward(cache, &hidden, start)?;
            }
            let logits = self.head.last_logits(&hidden)?;
            if let Some(token) = generation.accept_logits(&logits) {
                on_token(token);
            }
        }
        Ok(generation)
    }

    /// Generate text; the model's EOS tokens stop it. `on_text` sees text as it completes.
    pub fn generate(
        &self,
        prompt: &str,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput, ModelError> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "{} has no tokenizer.json",
                self.files.dir.display()
            ))
        })?;
        let prompt_tokens = tokenizer.encode(prompt)?;
        let mut params = params.clone();
        params.stop_tokens.extend(self.files.config.eos_tokens());
        let mut stream = TextStream::new(tokenizer.clone(), &prompt_tokens);
        let mut stream_error = None;
        let generation =
            self.generate_ids(prompt_tokens.clone(), &params, |id| match stream.push(id) {
                Ok(Some(text)) => on_text(&text),
                Ok(None) => {}
                Err(e) => stream_error = Some(e),
            })?;
        if let Some(e) = stream_error {
            return Err(e);
        }
        Ok(GenerationOutput {
            text: tokenizer.decode_after(&prompt_tokens, generation.generated())?,
            prompt_tokens,
            tokens: generation.generated().to_vec(),
            finish: generation.finish_reason().unwrap_or(FinishReason::Length),
        })
    }
}
