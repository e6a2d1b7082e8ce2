"""Spec strings -> loaded objects: the application layer's parsers (the CLI's options, the demo).

- `generators`: report-generator specs (`load_generator("hf:DIR")`, `r2gen:...`, `python:mod:fn`,
  `demo:clean`);
- `scorers`: classifier / encoder / LPIPS specs and the search's `CounterfactualScorer`
  (`search_scorer_from_specs`), including the decision that a 'demo:' generator is scored with the
  phantom world's stand-ins and the demo's calibrated thresholds;
- `search_grid`: the search grid's comma-separated options (`search_kwargs_from_text`).

Everything below the application layer (metrics, makers, the cyclic engine) takes the loaded
objects and never parses a spec or imports `cyclex.demo`. Submodules load their models lazily;
import them directly (`from cyclex.specs.scorers import search_scorer_from_specs`).
"""
