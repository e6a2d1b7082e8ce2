"""LPIPS's formula on a stand-in CNN, for worlds without ImageNet backbone weights (the phantom demo).

Zhang et al. 2018, eq. 1 with unit linear weights ("baseline" LPIPS):
    d(a, b) = sum_l mean_hw || f_l(a) / |f_l(a)| - f_l(b) / |f_l(b)| ||^2
over the network's Conv2d layers (activations normalised over channels). The demo uses the phantom
classifier's convolutions; real data should use `cyclex.explain.faithfulness.LPIPSMetric`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class StandInLPIPS:
    """Callable `(a, b) -> (B,)` distances for image batches (B, 1, H, W) in [0, 1].

    net: any module with Conv2d layers taking (B, 1, image_size, image_size); inputs of another size
    are resized (bilinear, antialiased) first.
    """

    def __init__(self, net: torch.nn.Module, image_size: int = 64) -> None:
        self.net = net.eval()
        self.image_size = int(image_size)
        self.layers = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        if not self.layers:
            raise ValueError("StandInLPIPS needs a network with Conv2d layers")

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in self.layers]
        try:
            x = images.float()
            if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
            self.net(x.to(next(self.net.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"StandInLPIPS needs two batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        total = torch.zeros(a.shape[0])
        for fa, fb in zip(self._features(a), self._features(b), strict=True):
            fa = fa / fa.norm(dim=1, keepdim=True).clamp_min(1e-10)
            fb = fb / fb.norm(dim=1, keepdim=True).clamp_min(1e-10)
            total += (fa - fb).pow(2).sum(1).mean((1, 2)).float().cpu()
        return total
