"""Run under torchrun by tests/test_stages.py: generate()'s static decoding step on an FSDP2 actor
loaded as ppo_lag.py loads it. Inside training.gathered the parameters are whole and the static step
samples the eager step's tokens (fp32: bit for bit); outside it, the static step is refused and
"auto" falls back to the eager step, and a sharded generate() leaves the model trainable.
Arguments: an LM checkpoint directory, the precision."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import training  # noqa: E402

d = training.setup_distributed("cpu", sys.argv[2])
actor = training.load_model(sys.argv[1], "lm", d, trainable=True).eval()
ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :3] = 0


def sample(decode):
    g = torch.Generator().manual_seed(1)
    return actor.generate(ids, mask, max_new_tokens=12, eos_id=2, generator=g, decode=decode)


with training.gathered(actor):
    eager = sample("eager")
    static = sample("static")
    # bf16 mixed precision: the CPU's bf16 attention rounds differently over the whole cache than
    # over its filled part, so only fp32 is compared bit for bit.
    assert torch.equal(static, eager) or sys.argv[2] == "bf16"
    assert torch.equal(sample("auto"), eager)
assert torch.equal(sample("auto"), eager)  # sharded: "auto" is the eager step
with pytest.raises(ValueError, match="inside training.gathered"):
    sample("static")
# A fresh FSDP actor whose first all-gather happens in a sharded generate(), then a training step:
# generate() must not decode in inference mode here: FSDP keeps the all-gather buffers it allocates
# then, and the training forward's all-gather into them would fail ("Inplace update to inference
# tensor outside InferenceMode").
fresh = training.load_model(sys.argv[1], "lm", d, trainable=True).eval()
fresh.generate(ids, mask, max_new_tokens=3, decode="eager")
logprobs = fresh.train()(ids, mask, targets=ids)
logprobs.sum().backward()
print(f"rank {d.rank}: ok")
training.teardown_distributed(d, exit_process=True)
