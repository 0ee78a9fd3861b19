"""The tiny models and data the suite builds once (``tests/conftest.py``'s ``models``) and
``benchmarks/bf16_drift.py`` reuses: a demo build at test scale."""

from ezmia.demo.train import ModelSizes

TEST_SIZES = ModelSizes(
    vocab_size=1024,
    n_layer=2,
    n_embd=64,
    n_head=2,
    pretrain_epochs=2,
    finetune_epochs=6,
    pretrain_lr=5e-3,
    full_lr=2e-3,
    lora_lr=2e-3,
    batch_size=32,
)
TEST_COUNTS = {"n_pretrain": 300, "n_members": 60, "n_nonmembers": 60}
