"""Every op, every head, the whole model and the fast step against float64 central differences:
the checks of `python -m nanoternary.gradcheck`, one test each."""
import numpy as np
import pytest

from nanoternary import gradcheck


@pytest.mark.parametrize("name", list(gradcheck.CHECKS))
def test_gradient(name):
    errors = gradcheck.run(name)
    assert errors
    bad = {t: e for t, e in errors.items() if not e < gradcheck.TOL}
    assert not bad, f"{name}: gradients off by more than {gradcheck.TOL:g}: " + \
        ", ".join(f"{t} {e:.2e}" for t, e in bad.items())


def test_the_checker_catches_a_broken_backward(monkeypatch, capsys):
    """A backward with a wrong factor is reported NOT OK, and the command fails."""
    from nanoternary.ops import norm
    real = norm.rmsnorm_backward

    def broken(dy, cache):
        dx, dg = real(dy, cache)
        return dx, 1.01 * dg
    monkeypatch.setattr(gradcheck, "rmsnorm_backward", broken)
    assert gradcheck.run("rmsnorm")["g"] > 1e-3
    assert gradcheck.main(["rmsnorm"]) == 1
    assert "NOT OK" in capsys.readouterr().out


def test_check_grad_names_the_tensor_and_the_worst_element():
    a = np.array([1.0, 2.0, 3.0])
    with pytest.raises(AssertionError, match=r"gradient of w: relative error .* at index \(1,\)"):
        gradcheck.check_grad("w", a + [0, 0.5, 0], a)
    assert gradcheck.check_grad("w", a, a) == 0.0


def test_the_command_runs_a_selection(capsys):
    assert gradcheck.main(["conv (dense)"]) == 0
    out = capsys.readouterr().out
    assert "conv (dense)" in out and "OK" in out and "all OK" in out
