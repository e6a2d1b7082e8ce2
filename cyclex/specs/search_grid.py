"""The search grid from text: `cyclex explain --search`'s comma-separated options as `SearchingMaker` keywords."""

from __future__ import annotations

from typing import Any

__all__ = ["early_stop_from_text", "search_kwargs_from_text"]


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


def early_stop_from_text(text: str | None) -> tuple[int, int] | None:
    """`--search-early-stop AFTER:BELOW` ("1:3") as `SearchGrid.early_stop` (None: no rule)."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).split(":")
    try:
        after_attempts, below_score = (int(p) for p in parts)
    except ValueError:  # not two parts, or not integers
        after_attempts, below_score = 0, -1
    if after_attempts < 1 or not 0 <= below_score <= 5:
        raise ValueError(f"--search-early-stop must be AFTER:BELOW with AFTER >= 1 attempts and BELOW a CF_Score "
                         f"in 0-5 (e.g. 1:3), got {text!r}")
    return after_attempts, below_score
