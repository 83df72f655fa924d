"""Run in a subprocess by tests/test_vllm.py (one vLLM engine per process): weight sync and log-prob agreement.

    python tests/vllm_worker.py tied|untied OUT_DIR

Builds a tiny random Qwen2 (embeddings tied or not) on the toy tokenizer, starts `rollout.VLLMRollout` on
it, perturbs the HF weights (as an optimiser step would), and measures the gap between the engine's
log-probs of its sampled tokens and the HF policy's (forward.token_fields, logits / T):
  * before the sync: the engine still samples from the old weights, so the gap is large;
  * after `mark_stale()` + generate (which syncs): the gap must be at fp32 noise level.
Prints one JSON line with both gaps.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import toy  # noqa: E402
from config import TrainConfig, resolve_defaults  # noqa: E402
from data import collate  # noqa: E402
from forward import token_fields  # noqa: E402
from rollout import VLLMRollout  # noqa: E402


def hf_logp(model, tok, prompt_ids, responses, temperature):
    batch = collate([p for p in prompt_ids for _ in range(len(responses) // len(prompt_ids))], responses,
                    tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        logp = token_fields(model, batch, temperature, set(), with_grad=False)["logp"]
    return logp, batch["response_mask"]


def gap(engine_logprobs, logp, mask):
    engine = torch.zeros_like(logp)
    for i, lp in enumerate(engine_logprobs):
        engine[i, :len(lp)] = torch.tensor(lp)
    assert all(len(lp) == int(m.sum()) for lp, m in zip(engine_logprobs, mask)), "one log-prob per token"
    return float(((logp - engine).abs() * mask).max())


def main(kind: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0)
    if kind == "untied":  # the same architecture with a separate LM head
        model.config.tie_word_embeddings = False
        model = type(model)(model.config)
    path = Path(out_dir) / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (kind == "tied"), "the model was not built as asked"
    cfg = resolve_defaults(TrainConfig(model=str(path), rollout="vllm", max_new_tokens=12,
                                       temperature=0.7))
    engine = VLLMRollout(model, tok, cfg, torch.device("cpu"), None, model_path=str(path))
    prompt_ids = [tok(ex["prompt"])["input_ids"] for ex in toy.load_split("heldout")[:4]]

    # before any change: engine and trainer hold the same weights
    responses = engine.generate(prompt_ids, 4)
    gap_initial = gap(engine.last_logprobs, *hf_logp(model, tok, prompt_ids, responses, cfg.temperature))
    # an "optimiser step": every parameter moves (for the tied model, the one shared matrix)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    responses = engine.generate(prompt_ids, 4)  # not marked stale: the engine samples the old policy
    gap_stale = gap(engine.last_logprobs, *hf_logp(model, tok, prompt_ids, responses, cfg.temperature))
    engine.mark_stale()
    responses = engine.generate(prompt_ids, 4)  # synced first
    gap_synced = gap(engine.last_logprobs, *hf_logp(model, tok, prompt_ids, responses, cfg.temperature))
    print(json.dumps({"kind": kind, "tied": tied, "gap_initial": gap_initial, "gap_stale": gap_stale,
                      "gap_synced": gap_synced, "tokens": sum(len(r) for r in responses)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
