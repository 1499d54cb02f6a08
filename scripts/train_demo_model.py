#!/usr/bin/env python3
"""Train mesh's embedded demo model and its draft sibling from the committed corpus.

The README's first command streams text from this model, split over three nodes, so a
newcomer sees a language model at work rather than random bytes. It is small enough to
commit (a few MB of f16 safetensors) and to retrain on a 2-core machine in under an hour.

    python3 -m venv target/pyenv && target/pyenv/bin/pip install torch transformers
    target/pyenv/bin/python scripts/train_demo_model.py            # both models
    target/pyenv/bin/python scripts/train_demo_model.py --only draft

Corpus: `mesh-core/models/corpus/` (public-domain novels from Project Gutenberg, see its
README). Output: `mesh-core/models/mesh-demo/` (the main model) and
`mesh-core/models/mesh-demo-draft/` (two blocks, same tokenizer: the draft model for
speculative decoding, distilled from the main model, so `--only draft` needs the main model
on disk). Both are Llama-architecture Hugging Face directories: config.json,
model.safetensors (float16), tokenizer.json, tokenizer_config.json (with a chat template
that renders the conversation as prose for the model to continue).

Everything is seeded; on the same torch build and thread count the run repeats exactly.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "mesh-core" / "models" / "corpus"
OUT = ROOT / "mesh-core" / "models"

VOCAB = 4096
SPECIALS = ["<unk>", "<s>", "</s>"]
SEQ = 256
SEED = 20261130

# The conversation as plain prose: what the model was trained on. Each message is a
# paragraph; the model continues after the last one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['content'] | trim }}\n"
    "{% endfor %}"
)

MODELS = {
    # ~7.5M parameters: 6 blocks of width 256 (GQA 8 query / 4 key-value heads).
    "main": dict(
        dir="mesh-demo",
        hidden=256,
        intermediate=688,
        layers=6,
        heads=8,
        kv_heads=4,
        steps=1000,
        batch=24,
        lr=3e-3,
    ),
    # Two blocks on the same tokenizer: cheap enough to run beside the main model and
    # propose tokens for it. What matters is that it guesses the main model's next token,
    # not the corpus's, so it is distilled from the main model: it starts as the main
    # model with its middle blocks cut out (embeddings, blocks `init_blocks`, final norm
    # and head copied over) and learns to match the main model's next-token distribution.
    "draft": dict(
        dir="mesh-demo-draft",
        hidden=256,
        intermediate=688,
        layers=2,
        heads=8,
        kv_heads=4,
        steps=1000,
        batch=8,
        lr=1e-3,
        teacher="main",
        init_blocks=[0, 5],
        gen_batch=32,
        gen_seq=128,
        gen_pool=8192,
        # Loss = (1 - ce_weight) * KL(teacher || draft) + ce_weight * cross-entropy on the
        # corpus's next tokens.
        ce_weight=0.0,
        # The same mix on the generated rows, whose next tokens are the teacher's greedy
        # choices: cross-entropy there rewards guessing exactly what the teacher picks.
        gen_ce_weight=0.5,
    ),
}

# Greedy continuations of these are where the draft's guesses are checked against the
# main model's (see `agreement`).
AGREEMENT_PROMPTS = [
    "It is a truth universally acknowledged",
    "Sherlock Holmes",
    "The night was",
    "My dear Watson,",
]


def corpus_text() -> str:
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        sys.exit(f"no corpus in {CORPUS}")
    return "".join(f.read_text(encoding="utf-8") for f in files)


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    # A BOS in front of every prompt, as Llama's tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def paragraphs_as_ids(tok: PreTrainedTokenizerFast, text: str):
    """The corpus as one token stream and the offsets where paragraphs start."""
    ids, starts = [], []
    for para in text.splitlines():
        if not para.strip():
            continue
        starts.append(len(ids))
        ids.extend(tok.encode(para + "\n", add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long), starts


def batches(ids, starts, batch, rng):
    bos = 1
    usable = [s for s in starts if s + SEQ <= len(ids)]
    while True:
        rows = []
        for _ in range(batch):
            s = rng.choice(usable)
            rows.append(torch.cat([torch.tensor([bos]), ids[s : s + SEQ - 1]]))
        yield torch.stack(rows)


def build(spec, vocab) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg)


def optimizer(model, spec):
    """AdamW (no decay on norms) and its learning rate at each step: a 5% warm-up, then a
    cosine down to a tenth."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=(0.9, 0.95),
    )
    steps, warmup = spec["steps"], max(1, spec["steps"] // 20)

    def lr_at(step):
        if step < warmup:
            return spec["lr"] * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return spec["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    return opt, lr_at


def train(name, spec, tok, ids, starts, held_out):
    model = build(spec, len(tok))
    params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {params / 1e6:.2f}M parameters, {spec['steps']} steps of "
          f"{spec['batch']}x{SEQ} tokens", flush=True)
    opt, lr_at = optimizer(model, spec)
    steps = spec["steps"]

    rng = random.Random(SEED)
    data = batches(ids, starts, spec["batch"], rng)
    model.train()
    began = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            rate = (step + 1) * spec["batch"] * SEQ / (time.time() - began)
            print(f"[{name}] step {step:4d} loss {loss.item():.3f} lr {lr_at(step):.2e} "
                  f"({rate:.0f} tokens/s, {time.time() - began:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        val = model(input_ids=held_out, labels=held_out).loss.item()
    print(f"[{name}] held-out loss {val:.3f} (perplexity {math.exp(val):.1f}), "
          f"{time.time() - began:.0f} s", flush=True)
    return model, val


def load_teacher(spec) -> LlamaForCausalLM:
    path = OUT / MODELS[spec["teacher"]]["dir"]
    if not (path / "model.safetensors").exists():
        sys.exit(f"distilling needs the {spec['teacher']} model in {path}; train it first")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy_continuations(teacher, ids, starts, rows, length, rng):
    """The teacher's own greedy continuations of paragraph openings, `length` tokens a row.

    This is the text a draft is asked about in speculative decoding: the main model's
    output, which is more repetitive and more predictable than the novels it learned from.
    Each chunk of rows opens with BOS and 1 to 16 corpus tokens; the rest is the teacher's.
    """
    usable = [s for s in starts if s + 16 <= len(ids)]
    out = []
    with torch.no_grad():
        for first in range(0, rows, 256):
            n, prefix = min(256, rows - first), rng.randint(1, 16)
            x = torch.stack([torch.cat([torch.tensor([1]), ids[s : s + prefix]])
                             for s in (rng.choice(usable) for _ in range(n))])
            step = teacher(input_ids=x, use_cache=True)
            while x.shape[1] < length:
                nxt = step.logits[:, -1:].argmax(-1)
                x = torch.cat([x, nxt], 1)
                step = teacher(input_ids=nxt, cache=step.cache, use_cache=True)
            out.append(x)
    return torch.cat(out)


def distil(name, spec, teacher, tok, ids, starts, held_out):
    """Train the draft to predict what the teacher predicts, at every position.

    Each step is `batch` rows of corpus and `gen_batch` rows of the teacher's own greedy
    text (from a pool of `gen_pool` rows made up front); on both the loss is
    KL(teacher || draft) at temperature 1 over every position, mixed with `ce_weight`
    (`gen_ce_weight` on generated rows) of cross-entropy on the rows' next tokens.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = build(spec, len(tok))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
        model.model.norm.weight.copy_(teacher.model.norm.weight)
        model.lm_head.weight.copy_(teacher.lm_head.weight)
        for mine, theirs in zip(model.model.layers, spec["init_blocks"], strict=True):
            mine.load_state_dict(teacher.model.layers[theirs].state_dict())
    params = sum(p.numel() for p in model.parameters())
    began = time.time()
    gen_rng = random.Random(SEED + 1)
    pool = greedy_continuations(teacher, ids, starts, spec["gen_pool"], spec["gen_seq"],
                                gen_rng) if spec["gen_batch"] else None
    print(f"[{name}] {params / 1e6:.2f}M parameters from blocks {spec['init_blocks']} of "
          f"{spec['teacher']}, distilled for {spec['steps']} steps of {spec['batch']}x{SEQ} "
          f"corpus + {spec['gen_batch']}x{spec['gen_seq']} generated tokens "
          f"(pool of {spec['gen_pool']} rows made in {time.time() - began:.0f} s)", flush=True)
    opt, lr_at = optimizer(model, spec)
    steps = spec["steps"]

    def losses(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                target = teacher(input_ids=x).logits.float().log_softmax(-1)
            logits = model(input_ids=x).logits.float()
        # KL(teacher || draft), averaged over every position.
        kl = F.kl_div(logits.log_softmax(-1).flatten(0, 1), target.flatten(0, 1),
                      log_target=True, reduction="batchmean")
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        agree = (logits.argmax(-1) == target.argmax(-1)).float().mean().item()
        return kl, ce, agree

    rng = random.Random(SEED)
    data = batches(ids, starts, spec["batch"], rng)
    corpus_tokens, gen_tokens = spec["batch"] * SEQ, spec["gen_batch"] * spec["gen_seq"]
    corpus_share = corpus_tokens / (corpus_tokens + gen_tokens)
    model.train()
    began = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        kl, ce, agree = losses(next(data))
        loss = (1 - spec["ce_weight"]) * kl + spec["ce_weight"] * ce
        (corpus_share * loss).backward()
        gen_kl, gen_agree = torch.zeros(()), 0.0
        if spec["gen_batch"]:
            rows = [gen_rng.randrange(len(pool)) for _ in range(spec["gen_batch"])]
            gen_kl, gen_ce, gen_agree = losses(pool[torch.tensor(rows)])
            gen_loss = (1 - spec["gen_ce_weight"]) * gen_kl + spec["gen_ce_weight"] * gen_ce
            ((1 - corpus_share) * gen_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            rate = (step + 1) * (corpus_tokens + gen_tokens) / (time.time() - began)
            print(f"[{name}] step {step:4d} kl {kl.item():.3f} ce {ce.item():.3f} "
                  f"top-1 {agree:.3f}, generated kl {gen_kl.item():.3f} "
                  f"top-1 {gen_agree:.3f}, "
                  f"lr {lr_at(step):.2e} ({rate:.0f} tokens/s, {time.time() - began:.0f} s)",
                  flush=True)
    model.eval()
    with torch.no_grad():
        val = model(input_ids=held_out, labels=held_out).loss.item()
    print(f"[{name}] held-out loss {val:.3f} (perplexity {math.exp(val):.1f}), "
          f"{time.time() - began:.0f} s", flush=True)
    return model, val


def agreement(name, draft, teacher, tok, held_out):
    """How often the draft's greedy next token is the teacher's.

    top1_agreement: over every position of the held-out text. generation_agreement: over
    the teacher's own greedy continuations (48 tokens, no repetition penalty) of
    AGREEMENT_PROMPTS, which is what speculative decoding asks the draft to guess.
    """
    draft, teacher = draft.float().eval(), teacher.float().eval()
    with torch.no_grad():
        top1 = (draft(input_ids=held_out).logits.argmax(-1)
                == teacher(input_ids=held_out).logits.argmax(-1)).float().mean().item()
        hits = total = 0
        for prompt in AGREEMENT_PROMPTS:
            x = tok(prompt, return_tensors="pt").input_ids
            n = x.shape[1]
            for _ in range(48):
                x = torch.cat([x, teacher(input_ids=x).logits[:, -1:].argmax(-1)], 1)
            guesses = draft(input_ids=x).logits[0, n - 1 : -1].argmax(-1)
            hits += (guesses == x[0, n:]).sum().item()
            total += x.shape[1] - n
    gen = hits / total
    print(f"[{name}] agreement with the teacher: top-1 {top1:.3f} "
          f"on held-out text, {gen:.3f} on its greedy generations", flush=True)
    return {"top1_agreement": round(top1, 4), "generation_agreement": round(gen, 4)}


def save(name, spec, model, tok, val, extra=None):
    out = OUT / spec["dir"]
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for junk in ["special_tokens_map.json", "generation_config.json", "chat_template.jinja"]:
        (out / junk).unlink(missing_ok=True)
    # The template inside tokenizer_config.json, where both old and new readers look.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    # Loading records where the tokenizer came from (`--only draft` loads the main model's);
    # left out so that both models' tokenizer files stay byte-identical.
    for key in ["is_local", "local_files_only"]:
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({
        "script": "scripts/train_demo_model.py",
        "model": name,
        "steps": spec["steps"],
        "tokens_seen": spec["steps"] * spec["batch"] * SEQ,
        "held_out_loss": round(val, 4),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **(extra or {}),
    }, indent=2) + "\n")
    print(f"[{name}] written to {out.relative_to(ROOT)}", flush=True)


def sample(model, tok, prompt, n=40):
    x = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        y = model.float().generate(x, max_new_tokens=n, do_sample=False,
                                   repetition_penalty=1.1)
    return tok.decode(y[0, x.shape[1]:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, help="override the step count (trial runs)")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    text = corpus_text()
    tok_dir = OUT / MODELS["main"]["dir"]
    if args.only == "draft" and (tok_dir / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(text)
    ids, starts = paragraphs_as_ids(tok, text)
    # The last 2% of paragraphs are held out to report a loss on unseen text.
    cut = starts[int(len(starts) * 0.98)]
    train_ids, held = ids[:cut], ids[cut:]
    train_starts = [s for s in starts if s < cut]
    held_out = held[: (len(held) // SEQ) * SEQ].view(-1, SEQ)[:16]
    print(f"corpus: {len(text)} chars, {len(ids)} tokens (vocab {len(tok)})", flush=True)
    for name, spec in MODELS.items():
        if args.only and name != args.only:
            continue
        spec = dict(spec)
        if args.steps:
            spec["steps"] = args.steps
        if "teacher" not in spec:
            model, val = train(name, spec, tok, train_ids, train_starts, held_out)
            save(name, spec, model, tok, val)
        else:
            teacher = load_teacher(spec)
            old_dir = OUT / spec["dir"]
            if (old_dir / "model.safetensors").exists():
                old = LlamaForCausalLM.from_pretrained(old_dir, dtype=torch.float32)
                agreement(f"{name}, before", old, teacher, tok, held_out)
                del old
            model, val = distil(name, spec, teacher, tok, train_ids, train_starts, held_out)
            # Measured as it will be served: with its weights rounded to float16.
            model = model.to(torch.float16).float()
            extra = {"distilled_from": MODELS[spec["teacher"]]["dir"],
                     "init_blocks": spec["init_blocks"],
                     "generated_tokens_seen": spec["steps"] * spec["gen_batch"]
                     * spec["gen_seq"],
                     "ce_weight": spec["ce_weight"], "gen_ce_weight": spec["gen_ce_weight"],
                     **agreement(name, model, teacher, tok, held_out)}
            save(name, spec, model, tok, val, extra)
        for prompt in ["It is a truth universally acknowledged", "Sherlock Holmes"]:
            print(f"[{name}] {prompt!r} ->{sample(model, tok, prompt)!r}", flush=True)


if __name__ == "__main__":
    main()
