"""Run under torchrun by tests/test_stages.py: properties of training.load_model under FSDP2 that
only show inside the ranks. Argument: a score-model checkpoint directory."""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import training  # noqa: E402

d = training.setup_distributed("cpu", "bf16")
frozen = training.load_model(sys.argv[1], "score", d, trainable=False)
trained = training.load_model(sys.argv[1], "score", d, trainable=True)
# Frozen models hold bf16 shards (FSDP would cast to bf16 anyway), trained ones fp32 master weights.
assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
assert {p.dtype for p in trained.parameters()} == {torch.float32}
ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    frozen_scores, trained_scores = frozen(ids), trained(ids)
assert torch.equal(frozen_scores, trained_scores), (frozen_scores - trained_scores).abs().max()
# After a forward, the frozen root (embeddings, head) is sharded again; the trained one stays
# gathered for its backward.
assert isinstance(frozen.tok_embeddings.weight, DTensor)
assert not isinstance(trained.tok_embeddings.weight, DTensor)
print(f"rank {d.rank}: ok")
training.teardown_distributed(d, exit_process=True)
