"""Expert (penalty) functions φ for Fields of Experts: (φ, φ', φ'') as separate functions
of (z, γ), so callers pay only for what they need.  The hot ones update fresh temporaries
in place (dtype preserved): with NumPy a new temporary per operation costs more than the
arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace as _xp


def _huber_value(z: Any, gamma: float) -> Any:
    xp = _xp(z)
    a = xp.abs(z)
    return xp.where(a <= gamma, z * z / (2.0 * gamma), a - gamma / 2.0)


def _huber_d2(z: Any, gamma: float) -> Any:
    xp = _xp(z)
    return xp.where(xp.abs(z) <= gamma, xp.full_like(z, 1.0 / gamma), xp.zeros_like(z))


def _smooth_l1_d2(z: Any, gamma: float) -> Any:
    q = z * z
    q += gamma * gamma
    out = _xp(z).sqrt(q)
    out *= q
    return (gamma * gamma) / out


def _lorentzian_d1(z: Any, gamma: float) -> Any:
    q = z * z
    q += 1.0
    out = 2.0 * z
    out /= q
    return out


def _lorentzian_value_d1(z: Any, gamma: float) -> tuple[Any, Any]:
    # one z² for both: φ = log1p(z²), φ' = 2z/(1 + z²)
    q = z * z
    value = _xp(z).log1p(q)
    q += 1.0
    out = 2.0 * z
    out /= q
    return value, out


def _lorentzian_d2(z: Any, gamma: float) -> Any:
    # 2(1 − z²)/(1 + z²)² = 2r(2r − 1) with r = 1/(1 + z²)
    r = z * z
    r += 1.0
    r = 1.0 / r
    out = 2.0 * r
    out -= 1.0
    out *= r
    out *= 2.0
    return out


def _student_t_value(z: Any, gamma: float) -> Any:
    return _xp(z).log1p((z / gamma) ** 2)


def _student_t_d1(z: Any, gamma: float) -> Any:
    # φ' = 2z/(γ² + z²)
    q = z * z
    q += gamma * gamma
    out = 2.0 * z
    out /= q
    return out


def _student_t_value_d1(z: Any, gamma: float) -> tuple[Any, Any]:
    # one (z/γ)² for both: φ = log1p(t²), φ' = 2t/(γ(1 + t²)) with t = z/γ
    t = z / gamma
    q = t * t
    value = _xp(z).log1p(q)
    q += 1.0
    q *= gamma
    t *= 2.0
    t /= q
    return value, t


def _student_t_d2(z: Any, gamma: float) -> Any:
    # φ'' = 2(γ² − z²)/(γ² + z²)² = 2r(2γ²r − 1) with r = 1/(γ² + z²)
    r = z * z
    r += gamma * gamma
    r = 1.0 / r
    out = (2.0 * gamma * gamma) * r
    out -= 1.0
    out *= r
    out *= 2.0
    return out


_FUNCTIONS = {
    "l2": (
        lambda z, gamma: 0.5 * z * z,
        lambda z, gamma: _xp(z).asarray(z, copy=True),  # fresh: callers scale it in place
        lambda z, gamma: _xp(z).ones_like(z),
    ),
    "huber": (_huber_value, lambda z, gamma: _xp(z).clip(z / gamma, -1.0, 1.0), _huber_d2),
    "smooth_l1": (
        lambda z, gamma: _xp(z).sqrt(gamma * gamma + z * z),
        lambda z, gamma: z / _xp(z).sqrt(gamma * gamma + z * z),
        _smooth_l1_d2,
    ),
    "lorentzian": (lambda z, gamma: _xp(z).log1p(z * z), _lorentzian_d1, _lorentzian_d2),
    "student_t": (_student_t_value, _student_t_d1, _student_t_d2),
}
EXPERT_NAMES = tuple(_FUNCTIONS)
WIDTHLESS_EXPERTS = ("l2", "lorentzian")  # φ does not depend on γ


@dataclass(frozen=True)
class Expert:
    """φ by name: ``l2`` z²/2; ``huber`` z²/(2γ) for |z| ≤ γ, |z| − γ/2 otherwise;
    ``smooth_l1`` √(γ² + z²); ``lorentzian`` log(1 + z²); ``student_t`` log(1 + z²/γ²),
    the Lorentzian of width γ (the negative log of a Student-t density up to constants).
    ``gamma`` is used by the Huber, smooth-ℓ1 and Student-t experts.

    ``student_t`` is the Lorentzian with filters scaled by 1/γ: the same FoE family, with
    filter entries of order one where the responses of images in [0, 1] reach the
    expert's heavy tail (with ``lorentzian`` the filters must grow to ~1/γ first)."""

    name: str
    gamma: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in _FUNCTIONS:
            raise ValueError(
                f"unknown expert {self.name!r}; valid names are {', '.join(EXPERT_NAMES)}"
            )
        if not self.gamma > 0:
            raise ValueError(f"expert gamma must be positive; got gamma={self.gamma!r}")

    def value(self, z: Any) -> Any:
        return _FUNCTIONS[self.name][0](z, self.gamma)

    def d1(self, z: Any) -> Any:
        return _FUNCTIONS[self.name][1](z, self.gamma)

    def value_and_d1(self, z: Any) -> tuple[Any, Any]:
        """(φ(z), φ'(z)) elementwise, sharing the work both need (fused for lorentzian)."""
        if self.name == "lorentzian":
            return _lorentzian_value_d1(z, self.gamma)
        if self.name == "student_t":
            return _student_t_value_d1(z, self.gamma)
        return self.value(z), self.d1(z)

    def d2(self, z: Any) -> Any:
        return _FUNCTIONS[self.name][2](z, self.gamma)
