"""`torchrun ... tests/dist_worker.py TRAIN_ARGS`: train.main with a deterministic rollout.

Sampling draws from each rank's own RNG, so a 2-process run and a 1-process run never see the same
responses. Replacing `HFRollout.generate` with a function of the prompt alone makes the global rollout
batch identical for any number of ranks, and whatever differs in the update is then the distributed code
(global normalisers, gradient averaging, metric reduction, DAPO's global group selection).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import toy  # noqa: E402
import train  # noqa: E402
from rollout import HFRollout  # noqa: E402


def scripted_generate(self, prompt_ids, n, temperature=None, top_p=None, max_new_tokens=None):
    """n responses per prompt, a function of the prompt only: a mix of correct solutions and wrong chains
    of different lengths (so advantages and per-sequence normalisers are non-trivial); one prompt in three
    gets an all-wrong group, which DAPO's dynamic sampling must drop."""
    tok = self.tokenizer
    out = []
    for ids in prompt_ids:
        prompt = tok.decode(ids, skip_special_tokens=True)
        numbers_text, target_text = prompt.rstrip(":").split(">")
        numbers, target = [int(x) for x in numbers_text.split()], int(target_text)
        solutions = sorted(toy.solve(numbers, target).values())
        all_wrong = sum(ids) % 3 == 0
        for j in range(n):
            if j % 2 == 0 and not all_wrong:
                text = solutions[(j // 2) % len(solutions)]
            else:
                text = ",".join(f"{numbers[0]}+{numbers[1]}={numbers[0] + numbers[1]}" for _ in range(1 + j % 3))
            out.append(tok(text)["input_ids"] + [tok.eos_token_id])
    return out


if __name__ == "__main__":
    HFRollout.generate = scripted_generate
    sys.exit(train.main(sys.argv[1:]))
