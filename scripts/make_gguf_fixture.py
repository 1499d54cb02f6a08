#!/usr/bin/env python3
"""Write GGUF files from the transformers fixtures, as llama.cpp's converter lays them out.

Generated with gguf 0.19.0 (PyPI), numpy 2.4.6, safetensors 0.8.0, tokenizers 0.23.3,
sentencepiece 0.2.3, python 3.11.7.
Regenerate from the workspace root (after scripts/make_hf_fixture.py):

    pip install gguf safetensors numpy
    python scripts/make_gguf_fixture.py

Written into mesh-core/tests/fixtures/gguf/:

  llama_gqa-q8_0.gguf      hf_llama_gqa, block projections Q8_0, everything else F32
  llama_gqa-q4_0-f16.gguf  hf_llama_gqa, block projections Q4_0, embeddings and LM head F16
  llama3_tied-q8_0.gguf    hf_llama3_tied (tied, Llama 3 rope scaling as a rope_freqs
                           tensor, as the converter writes it), projections Q8_0
  qwen2_tied-q8_0.gguf     hf_qwen2_tied, block projections Q8_0, biases and the rest F32,
                           with Qwen2.5's chat template as tokenizer.chat_template
  tokenizer-gpt2.{json,gguf}  a byte-level BPE tokenizer trained here (tokenizers, Qwen2's
                           pre-tokenizer) and the same tokenizer as GGUF metadata
  tokenizer-spm.gguf, tokenizer-spm.expected.json  a SentencePiece BPE vocabulary (byte
                           fallback) trained here, as GGUF metadata, and sentencepiece's
                           own encodings of a few texts

Names and layout follow llama.cpp's convert_hf_to_gguf.py: `token_embd`, `blk.N.attn_q`,
..., `output_norm`, `output` (absent when tied); for the `llama` architecture the q and k
rows are permuted (LlamaModel.permute) because llama.cpp's rope rotates adjacent pairs
where transformers rotates halves. Qwen2 is written unpermuted, as the converter does.
Quantization is gguf-py's own (gguf.quants.quantize), not candle's.
"""

import json
import math
import os

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "mesh-core", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "gguf")
Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: halves-rotation rows -> adjacent-pair rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.<weight|bias>
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{NAMES[module]}.{parts[-1]}"


def write(fixture: str, out_name: str, arch: str, proj: Q, head: Q, template: str | None = None) -> None:
    src = os.path.join(FIXTURES, fixture)
    cfg = json.load(open(os.path.join(src, "config.json")))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta"))
    path = os.path.join(OUT, out_name)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(fixture)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if template is not None:
        w.add_chat_template(template)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        # llama.cpp's LlamaModel.generate_extra_tensors: Llama 3's scaling as one divisor
        # per rotary frequency, in the `rope_freqs` tensor.
        dim = cfg.get("head_dim") or cfg["hidden_size"] // nh
        freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old / low, old / high
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    for name in sorted(tensors):
        data = tensors[name].astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, nh)
        if arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, nkv)
        if data.ndim == 1:
            qtype = Q.F32
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            qtype = head
        else:
            qtype = proj
        if qtype == Q.F32:
            w.add_tensor(gguf_name(name), data)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {os.path.getsize(path)} bytes")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    qwen_template = open(os.path.join(FIXTURES, "chat", "qwen2.5-instruct.jinja")).read()
    write("hf_llama_gqa", "llama_gqa-q8_0.gguf", "llama", Q.Q8_0, Q.F32)
    write("hf_llama_gqa", "llama_gqa-q4_0-f16.gguf", "llama", Q.Q4_0, Q.F16)
    write("hf_llama3_tied", "llama3_tied-q8_0.gguf", "llama", Q.Q8_0, Q.F32)
    write("hf_qwen2_tied", "qwen2_tied-q8_0.gguf", "qwen2", Q.Q8_0, Q.F32, qwen_template)
    write_tokenizer_fixture()
    write_spm_fixture()



# --- A byte-level BPE tokenizer in GGUF metadata (tokenizer.ggml.model = "gpt2") ---------

QWEN2_PRE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "The mesh runs models on everyone's GPUs, a span of blocks on each machine.",
    "Hello, world! Hello again, world. It's 2026 and we'll see 12345 tokens.",
    "Qwen2 and Llama 3 use byte-level BPE; SentencePiece is another story.",
    "  indented   text\n\nwith newlines\r\n and tabs\tin it  ",
    "café, naïve, Zürich, 東京, данные, 😀 emoji.",
]


def write_tokenizer_fixture() -> None:
    """tokenizer-gpt2.json (trained here with `tokenizers`, Qwen2's pre-tokenizer) and
    tokenizer-gpt2.gguf: a stub qwen2 model (one 8-wide embedding, no blocks) whose metadata
    holds that tokenizer as llama.cpp's converter writes it (tokens, token_type, merges,
    pre = "qwen2"). mesh must rebuild from the GGUF a tokenizer encoding like the JSON one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(os.path.join(OUT, "tokenizer-gpt2.json"))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]

    path = os.path.join(OUT, "tokenizer-gpt2.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {os.path.getsize(path)} bytes, {len(tokens)} tokens, {len(merges)} merges")



# --- A SentencePiece BPE tokenizer in GGUF metadata (tokenizer.ggml.model = "llama") -------

SPM_TEXTS = [
    "Hello, world!",
    "The mesh runs models on everyone's GPUs.",
    "  indented   text\n\nwith newlines\tand tabs  ",
    "It's 2026: 1234567 tokens.",
    "café naïve 東京 😀",
]


def write_spm_fixture() -> None:
    """tokenizer-spm.gguf: a stub llama model whose metadata holds a SentencePiece BPE
    vocabulary (byte fallback, as Llama 2's) the way llama.cpp's converter writes it
    (tokens, scores, token types), and tokenizer-spm.expected.json: what sentencepiece
    itself encodes for SPM_TEXTS, BOS first (add_bos_token), the reference mesh matches."""
    import tempfile

    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join(CORPUS * 20))
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "m"), vocab_size=400, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, "m.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                     gguf.TokenType.CONTROL if sp.is_control(i) else
                     gguf.TokenType.BYTE if sp.is_byte(i) else
                     gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL)
    path = os.path.join(OUT, "tokenizer-spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = {t: [sp.bos_id()] + sp.encode(t) for t in SPM_TEXTS}
    with open(os.path.join(OUT, "tokenizer-spm.expected.json"), "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{path}: {os.path.getsize(path)} bytes, {len(tokens)} tokens")


if __name__ == "__main__":
    main()
