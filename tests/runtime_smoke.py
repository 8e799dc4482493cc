"""The README's runtime install can train, save and load: run directly (``python
tests/runtime_smoke.py``), not by pytest, in a venv with only ``torch`` and ``pip install .``.

numpy is blocked before torch is imported, so this also checks the file I/O needs no numpy where
numpy happens to be installed. Any failure raises (exit status 1) with a message.
"""

import os
import sys
import tempfile

sys.modules["numpy"] = None  # `import numpy` now raises ImportError, as in a venv without it

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import randlora  # noqa: E402


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def main() -> None:
    model = randlora.inject(build(), ["0", "2"], rank=4, alpha=8.0)
    x, y = torch.randn(5, 16), torch.randn(5, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    lam = model[0].lam.detach()
    if torch.count_nonzero(lam) == 0:
        raise SystemExit("runtime smoke: training did not change lam")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        randlora.save_adapter(model, path)
        fresh = randlora.load_adapter(build(), path)
    for key, value in randlora.adapter_state_dict(model).items():
        if not torch.equal(value, randlora.adapter_state_dict(fresh)[key]):
            raise SystemExit(f"runtime smoke: {key} differs after save_adapter/load_adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        if not torch.equal(model(x), fresh(x)):
            raise SystemExit("runtime smoke: outputs differ after save_adapter/load_adapter")
    if "numpy" in sys.modules and sys.modules["numpy"] is not None:
        raise SystemExit("runtime smoke: numpy was imported")
    print(f"runtime smoke ok: torch {torch.__version__}, randlora {randlora.__version__} from {randlora.__file__}, no numpy")


if __name__ == "__main__":
    main()
