"""Class-activation maps computed inside the exported classifier graph (no gradients at run time).

The classifier (:class:`trainer.models.NoduleClassifier`) ends in a 1x1 convolution over its last
feature map (the head's 3x3 conv + BN + ReLU): that convolution is the "final linear layer" of
CAM (Zhou et al. 2016), applied at every location, and the slice logit is the maximum of its
map. The CAM is therefore the last feature map weighted by that layer's weights for the
positive class (bias left out), min-max normalised per image to [0, 1] (the original CAM's
display normalisation: the ReLU after shifting by the minimum; a ReLU of the raw map alone was
all zeros for a classifier that learned a large negative bias and negative weights), bilinearly
upsampled to the input size. It shows *where* the evidence is strongest relative to the rest of
the slice, also on negative slices: read it with the probability, which is why the overlay
carries it.

:class:`ClassifierWithCam` returns ``(logits, cam)``: exported as the outputs ``logits``
``[N, 2]`` (unchanged) and ``cam`` ``[N, 1, H, W]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models import NoduleClassifier

OUTPUT_NAMES = ("logits", "cam")


class ClassifierWithCam(torch.nn.Module):
    """Wraps a trained :class:`NoduleClassifier` (eval mode) to also return its CAM."""

    def __init__(self, classifier: NoduleClassifier, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(classifier, NoduleClassifier):
            raise TypeError(f"CAM needs a NoduleClassifier, got {type(classifier).__name__}")
        self.classifier = classifier
        self.eps = eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.classifier
        final = c.head[-1]
        dense = c.dense(x)  # final(features) = weights . features + bias
        weighted = dense - final.bias.view(1, -1, 1, 1)  # positive class, bias left out
        positive = torch.amax(dense, dim=(2, 3))
        logits = torch.cat([torch.zeros_like(positive), positive], dim=1)
        low = torch.amin(weighted, dim=(2, 3), keepdim=True)
        cam = torch.relu(weighted - low)
        cam = cam / (torch.amax(cam, dim=(2, 3), keepdim=True) + self.eps)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, cam.clamp(0.0, 1.0)
