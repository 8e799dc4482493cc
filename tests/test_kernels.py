"""The fused Triton kernels, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

On CUDA the same kernels build S and reduce dS; here they must match the eager code (and the
float64 reference) on fresh random inputs. The interpreter mode is fixed when triton is first
imported, so each check runs in a fresh process.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernels_match_eager_code():
    out = run_interpreted(
        """
        import torch, randlora
        assert randlora.triton is not None, "triton is a test dependency: pip install -e '.[test]'"
        assert randlora._use_triton(torch.zeros(1))
        g = torch.Generator().manual_seed(1234)
        # (r, n, d, d_max): a view A[:, :d] of wider bases, d not a multiple of the block sizes
        for r, n, d, d_max in [(4, 3, 300, 307), (1, 5, 17, 17), (8, 8, 64, 100), (3, 2, 1030, 1030)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                lam = torch.randn(r, n, generator=g)
                gam = torch.randn(n, d, generator=g)
                A = torch.randn(r, d_max, generator=g).to(dtype)[:, :d]
                S = randlora._small_basis(lam, gam, A, dtype)
                E = randlora._small_basis_eager(lam, gam, A, dtype)
                assert S.shape == (r * n, d) and S.dtype == dtype
                # the interpreter rounds to bfloat16 by truncation, the GPU to nearest: 1 ulp
                tol = 8e-3 if dtype == torch.bfloat16 else 0.0
                err = ((S.float() - E.float()).abs() / E.float().abs().clamp_min(1e-30)).max().item()
                assert err <= tol, (r, n, d, dtype, err)
                dS = torch.randn(r * n, d, generator=g).to(dtype)
                dlam, dgam = randlora._scale_grads(dS, lam, gam, A, 2.5)
                elam, egam = randlora._scale_grads_eager(dS, lam, gam, A, 2.5)
                assert dlam.dtype == dgam.dtype == torch.float32
                assert dlam.shape == (r, n) and dgam.shape == (n, d)
                for got, want in ((dlam, elam), (dgam, egam)):
                    rel = ((got - want).norm() / want.norm()).item()
                    assert rel < 1e-5, (r, n, d, dtype, rel)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_layer_with_kernels_matches_float64_reference():
    out = run_interpreted(
        """
        import torch, randlora
        assert randlora.triton is not None
        torch.manual_seed(0)
        for in_f, out_f in [(24, 40), (40, 24), (33, 33)]:
            for path in ("build", "factorized"):
                model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
                randlora.inject(model, ["0"], 5, seed=3, strategy=path)
                layer = model[0]
                with torch.no_grad():
                    layer.lam.normal_()
                    layer.gam.normal_()
                x = torch.randn(2, 7, in_f, requires_grad=True)
                dy = torch.randn(2, 7, out_f)
                model(x).backward(dy)
                # float64 reference with ΔW built explicitly (docs/MATH.md#the-update)
                lam = layer.lam.detach().double().requires_grad_()
                gam = layer.gam.detach().double().requires_grad_()
                A, Bf = layer._bases.dense(layer.D, layer.d, torch.float64)
                S = (lam[:, :, None] * A[:, None, :] * gam[None]).reshape(-1, layer.d)
                M = Bf @ S
                W = layer.base.weight.double() + (M if out_f >= in_f else M.t()) * layer.scaling
                xr = x.detach().double().requires_grad_()
                y = xr @ W.t() + layer.base.bias.double()
                y.backward(dy.double())
                for got, want in ((x.grad, xr.grad), (layer.lam.grad, lam.grad), (layer.gam.grad, gam.grad)):
                    rel = ((got.double() - want).norm() / want.norm()).item()
                    assert rel < 1e-5, (in_f, out_f, path, rel)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
