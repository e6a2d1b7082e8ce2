"""The search grid from text: `cyclex explain --search`'s comma-separated options as `SearchingMaker` keywords."""

from __future__ import annotations

from typing import Any

__all__ = ["search_kwargs_from_text"]


def search_kwargs_from_text(checkpoints: str, strengths: str, guidances: str, null_settings: str,
                            required_score: int = 5) -> dict[str, Any]:
    """The CLI's comma-separated grid ("best_l2,best_l1", "1.0,0.9,0.8", "7,8,9,10", "default,underfit")
    as `SearchingMaker` keyword arguments."""

    def items(text: str, option: str) -> list[str]:
        values = [v.strip() for v in str(text).split(",") if v.strip()]
        if not values:
            raise ValueError(f"{option} needs at least one comma-separated value, got {text!r}")
        return values

    def numbers(text: str, option: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in items(text, option))
        except ValueError as err:
            raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from err

    return {
        "checkpoints": tuple(items(checkpoints, "--search-checkpoints")),
        "strengths": numbers(strengths, "--search-strengths"),
        "guidances": numbers(guidances, "--search-guidances"),
        "null_settings": tuple(items(null_settings, "--null-settings")),
        "required_score": int(required_score),
    }
