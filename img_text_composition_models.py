"""Image-text composition models: image-only, text-only, Concat, TIRG, TIRGLastConv, ComposeAE.

All share a ResNet-18 image encoder (global average pooling, then a linear layer to
``embed_dim``) and take any text encoder from ``text_model`` (an ``nn.Module`` with ``out_dim``).
The models know nothing about datasets: ``forward`` returns features (and a model's own loss
terms, such as ComposeAE's decoder and rotational-symmetry losses, in ``extra_losses``), and the
training step in ``main.py`` turns them into the loss.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision

import torch_function
from torch_function import NormalizationLayer


class PretrainedWeightsMissing(RuntimeError):
    """Raised when ImageNet weights were asked for but are not in torchvision's cache."""


def resnet18_backbone(pretrained: bool) -> torchvision.models.ResNet:
    """A torchvision ResNet-18; with ``pretrained`` its ImageNet weights come from the local cache.

    Nothing is downloaded: an absent file is an error that says where to put it.
    """
    model = torchvision.models.resnet18(weights=None)
    if pretrained:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        file_name = os.path.basename(weights.url)
        path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        if not os.path.isfile(path):
            raise PretrainedWeightsMissing(
                f"--pretrained needs torchvision's ImageNet ResNet-18 weights at {path}, and that "
                f"file does not exist (nothing is downloaded at run time). Download {weights.url} "
                f"to that path (or set TORCH_HOME to a folder whose checkpoints/ holds it), "
                f"or pass --pretrained False to train the backbone from scratch."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


class ImgTextCompositionBase(torch.nn.Module):
    """ResNet-18 image encoder + a text encoder + a learnably scaled normalization layer.

    Subclasses implement ``compose_img_text_features`` (feature-level composition) or override
    ``compose_img_text``. ``composes_features`` says whether a query can be composed from cached
    image features (True for every model but TIRGLastConv).
    """

    composes_features = True

    def __init__(
        self, text_encoder: torch.nn.Module, embed_dim: int = 512, pretrained: bool = False
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.text_dim = text_encoder.out_dim
        # Registered in the TIRG and GA codes' order (the model's own `a` first, then the
        # normalization layer, image, text, composer): named_parameters() gives the same order,
        # which the public L_GA^I form counts by (--ga_iso_form public).
        self.normalization_layer = NormalizationLayer(normalize_scale=4.0, learn_scale=True)
        img_model = resnet18_backbone(pretrained)
        img_model.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        img_model.fc = torch.nn.Sequential(torch.nn.Linear(512, embed_dim))
        self.img_model = img_model
        self.text_model = text_encoder

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        """ResNet parameters other than the final linear layer (trained at 0.1x lr, as TIRG)."""
        fc = {id(p) for p in self.img_model.fc.parameters()}
        return [p for p in self.img_model.parameters() if id(p) not in fc]

    def extract_img_feature(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, 3, H, W) normalized -> (B, embed_dim)."""
        return self.img_model(imgs)

    def extract_text_feature(self, texts: list[str]) -> torch.Tensor:
        """texts: B strings -> (B, text_dim)."""
        return self.text_model(texts)

    def compose_img_text_features(
        self, img_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """(B, embed_dim), (B, text_dim) -> (B, embed_dim)."""
        raise NotImplementedError

    def compose_img_text(self, imgs: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Query features before normalization: (B, 3, H, W), B strings -> (B, embed_dim)."""
        return self.compose_img_text_features(
            self.extract_img_feature(imgs), self.extract_text_feature(texts)
        )

    def forward(
        self, source_imgs: torch.Tensor, texts: list[str], target_imgs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One training forward pass.

        Returns a dict with ``query`` and ``target`` (B, embed_dim), both normalized and scaled,
        ``source_features`` (the image representation the query was composed from: the target of
        the cheap feature-space GA variant), and ``extra_losses`` (model-specific loss terms).
        """
        source_features = self.extract_img_feature(source_imgs)
        text_features = self.extract_text_feature(texts)
        query = self.compose_img_text_features(source_features, text_features)
        target = self.extract_img_feature(target_imgs)
        return {
            "query": self.normalization_layer(query),
            "target": self.normalization_layer(target),
            "source_features": source_features,
            "extra_losses": self.extra_losses(source_features, text_features, query, target),
        }

    def extra_losses(
        self,
        source_features: torch.Tensor,
        text_features: torch.Tensor,
        query: torch.Tensor,
        target_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Model-specific loss terms of a training batch, by name (none here).

        source_features, target_features, query: (B, embed_dim) before normalization;
        text_features: (B, text_dim). The training step adds each term to L with weight
        ``loss_weights(args).get(name, 1.0)``.
        """
        return {}


class SimpleModelImageOnly(ImgTextCompositionBase):
    """The query is the source image alone (the text is ignored)."""

    def compose_img_text_features(self, img_features, text_features):
        return img_features


class SimpleModelTextOnly(ImgTextCompositionBase):
    """The query is the text alone, projected to the image space."""

    def __init__(self, text_encoder, embed_dim=512, pretrained=False):
        super().__init__(text_encoder, embed_dim, pretrained)
        self.text_projection = (
            torch.nn.Identity()
            if self.text_dim == embed_dim
            else torch.nn.Linear(self.text_dim, embed_dim)
        )

    def compose_img_text_features(self, img_features, text_features):
        return self.text_projection(text_features)


class Concat(ImgTextCompositionBase):
    """Concatenation of image and text features followed by a small MLP."""

    def __init__(self, text_encoder, embed_dim=512, pretrained=False):
        super().__init__(text_encoder, embed_dim, pretrained)
        in_dim = embed_dim + self.text_dim
        self.composer = torch.nn.Sequential(
            torch.nn.BatchNorm1d(in_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(in_dim, in_dim),
            torch.nn.BatchNorm1d(in_dim),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(in_dim, embed_dim),
        )

    def compose_img_text_features(self, img_features, text_features):
        return self.composer(torch.cat([img_features, text_features], dim=1))


class TIRG(ImgTextCompositionBase):
    """Text Image Residual Gating (Vo et al., CVPR 2019).

    f = a0 * sigmoid(gate([x, t])) * x + a1 * res([x, t]), with a initialised to (1, 10).
    """

    def __init__(self, text_encoder, embed_dim=512, pretrained=False):
        super().__init__(text_encoder, embed_dim, pretrained)
        in_dim = embed_dim + self.text_dim
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.gated_feature_composer = torch.nn.Sequential(
            torch.nn.BatchNorm1d(in_dim), torch.nn.ReLU(), torch.nn.Linear(in_dim, embed_dim)
        )
        self.res_info_composer = torch.nn.Sequential(
            torch.nn.BatchNorm1d(in_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(in_dim, in_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(in_dim, embed_dim),
        )

    def compose_img_text_features(self, img_features, text_features):
        x = torch.cat([img_features, text_features], dim=1)
        gate = self.gated_feature_composer(x)
        residual = self.res_info_composer(x)
        return torch.sigmoid(gate) * img_features * self.a[0] + residual * self.a[1]


class TIRGLastConv(ImgTextCompositionBase):
    """TIRG applied to the last convolutional feature map (512 x h x w) instead of the pooled one.

    The query cannot be composed from pooled features, so evaluation encodes query images again.
    """

    composes_features = False

    def __init__(self, text_encoder, embed_dim=512, pretrained=False):
        super().__init__(text_encoder, embed_dim, pretrained)
        in_dim = 512 + self.text_dim
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))

        def mod_block():
            return torch.nn.Sequential(
                torch.nn.BatchNorm2d(in_dim),
                torch.nn.Conv2d(in_dim, in_dim, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(in_dim, 512, 3, padding=1),
            )

        self.mod2d = mod_block()
        self.mod2d_gate = mod_block()

    def feature_map(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> ResNet layer4 output (B, 512, h, w)."""
        m = self.img_model
        x = m.maxpool(m.relu(m.bn1(m.conv1(imgs))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def compose_feature_map(
        self, feature_map: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """(B, 512, h, w), (B, text_dim) -> (B, embed_dim)."""
        b, _, h, w = feature_map.shape
        text_map = text_features.view(b, -1, 1, 1).expand(b, text_features.shape[1], h, w)
        z = torch.cat([feature_map, text_map], dim=1)
        x = self.a[0] * torch.sigmoid(self.mod2d_gate(z)) * feature_map + self.a[1] * self.mod2d(z)
        return self.img_model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def compose_img_text(self, imgs, texts):
        return self.compose_feature_map(self.feature_map(imgs), self.extract_text_feature(texts))

    def forward(self, source_imgs, texts, target_imgs):
        source_features = self.feature_map(source_imgs)
        query = self.compose_feature_map(source_features, self.extract_text_feature(texts))
        target = self.extract_img_feature(target_imgs)
        return {
            "query": self.normalization_layer(query),
            "target": self.normalization_layer(target),
            "source_features": source_features,
            "extra_losses": {},
        }


class BatchNorm1dAnyBatch(torch.nn.BatchNorm1d):
    """BatchNorm1d that also takes a training batch of one sample.

    One sample has no batch variance, so ``torch.nn.BatchNorm1d`` raises; this normalizes it with
    the running statistics instead (and leaves them unchanged). Every larger batch is plain
    BatchNorm1d, with the same parameters and state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def rotate(
    real: torch.Tensor, imag: torch.Tensor, delta: torch.Tensor, conjugate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply the complex vector real + i*imag by exp(i*delta), or by exp(-i*delta) with
    ``conjugate``. All (B, D) -> ((B, D), (B, D)). Rotating by delta then by its conjugate is the
    identity."""
    cos, sin = torch.cos(delta), torch.sin(delta)
    if conjugate:
        sin = -sin
    return real * cos - imag * sin, real * sin + imag * cos


class ComplexProjection(torch.nn.Module):
    """ComposeAE's complex projection: phi = x * exp(i * delta).

    x is the image feature mapped by a small MLP; delta, the text mapped to ``embed_dim`` angles,
    acts as a rotation in the complex space (``conjugate`` rotates the other way, for the
    rotational-symmetry loss). Layers as the public code (its text input is fixed at 768 there;
    here it is any ``text_dim``).
    """

    def __init__(self, embed_dim: int, text_dim: int):
        super().__init__()
        # text first, as the public code's module (its parameter order)
        self.text_mlp = torch.nn.Sequential(
            BatchNorm1dAnyBatch(text_dim),
            torch.nn.Linear(text_dim, embed_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(embed_dim, embed_dim),
        )
        self.image_mlp = torch.nn.Sequential(
            BatchNorm1dAnyBatch(embed_dim),
            torch.nn.Linear(embed_dim, embed_dim),
            torch.nn.Dropout(p=0.5),
            torch.nn.ReLU(),
            torch.nn.Linear(embed_dim, embed_dim),
        )

    def forward(
        self, img_features: torch.Tensor, text_features: torch.Tensor, conjugate: bool = False
    ) -> dict[str, torch.Tensor]:
        """(B, embed_dim), (B, text_dim) -> {x, delta, real, imag}, each (B, embed_dim)."""
        x = self.image_mlp(img_features)
        delta = self.text_mlp(text_features)
        real, imag = rotate(x, torch.zeros_like(x), delta, conjugate)
        return {"x": x, "delta": delta, "real": real, "imag": imag}


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> torch.nn.Sequential:
    """ComposeAE's mapping/decoder block: BatchNorm, ReLU, Linear, ReLU, Linear."""
    return torch.nn.Sequential(
        BatchNorm1dAnyBatch(in_dim),
        torch.nn.ReLU(),
        torch.nn.Linear(in_dim, hidden_dim),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden_dim, out_dim),
    )


class ComposeAE(ImgTextCompositionBase):
    """ComposeAE (Anwaar, Labintcev and Kleinsteuber, WACV 2021), following the public code.

    The query is theta = a[1] * rho(phi) + a[0] * rho_conv(phi, x, delta, z), a = (1, 10, ...):
    - phi = x * exp(i * delta): the image rotated by the text in the complex space
      (``ComplexProjection``; the linear and the convolutional branch each have their own, as in
      the public code);
    - rho: a linear mapping of [Re phi, Im phi] (B, 2E) back to the image space;
    - rho_conv: a Conv1d over the 5 channels [x, delta, z, Re phi, Im phi] (B, 5, E), max-pooled to
      16 positions, then an MLP (z is the raw image feature).

    Extra losses of ``forward`` (``out["extra_losses"]``), returned ALREADY WEIGHTED with the
    public code's weights (main loss 1.0, then 0.1, 0.1, 0.01), so the training step adds them
    with weight 1.0:
    - ``decoder_img``: 0.1 * MSE(image_decoder(theta), z_source);
    - ``decoder_text``: 0.1 * MSE(text_decoder(theta), t);
    - ``rot_sym``: 0.01 * the matching loss between the normalized composition of the TARGET
      image features with the conjugate rotation and the normalized source features (the
      rotational-symmetry loss: undoing the modification should lead back to the source).

    ``matching_loss`` (query (B, D), target (B, D) -> scalar) is the run's main loss (batch-based
    classification or soft triplet), as the public code uses for rot_sym. Unlike the public code
    it takes any batch size (it hard-codes 32 for the conjugate sign), any text dimension (its
    projection is fixed at 768) and any ``embed_dim``; BatchNorm layers accept a training batch
    of one (``BatchNorm1dAnyBatch``).
    """

    uses_matching_loss = True
    LOSS_WEIGHTS = {"decoder_img": 0.1, "decoder_text": 0.1, "rot_sym": 0.01}
    CONV_CHANNELS, CONV_POSITIONS = 64, 16

    def __init__(
        self,
        text_encoder,
        embed_dim=512,
        pretrained=False,
        matching_loss=torch_function.batch_classification_loss,
    ):
        super().__init__(text_encoder, embed_dim, pretrained)
        e, t = embed_dim, self.text_dim
        self.matching_loss = matching_loss
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        # the public code's order: its encoderLinear (projection, mapping), then encoderWithConv
        # (projection, then its ConvMapping: mapping before conv)
        self.projection_linear = ComplexProjection(e, t)
        self.mapping_linear = _mlp(2 * e, e, e)
        self.projection_conv = ComplexProjection(e, t)
        conv_out = self.CONV_CHANNELS * self.CONV_POSITIONS
        self.mapping_conv = _mlp(conv_out, e, e)
        self.conv = torch.nn.Conv1d(5, self.CONV_CHANNELS, kernel_size=3, padding=1)
        self.conv_pool = torch.nn.AdaptiveMaxPool1d(self.CONV_POSITIONS)
        self.image_decoder = _mlp(e, e, e)
        self.text_decoder = _mlp(e, t, t)

    def compose_img_text_features(self, img_features, text_features, conjugate: bool = False):
        """(B, embed_dim), (B, text_dim) -> theta (B, embed_dim); conjugate: rotate by -delta."""
        phi = self.projection_linear(img_features, text_features, conjugate)
        theta_linear = self.mapping_linear(torch.cat([phi["real"], phi["imag"]], dim=1))
        phi = self.projection_conv(img_features, text_features, conjugate)
        channels = torch.stack(
            [phi["x"], phi["delta"], img_features, phi["real"], phi["imag"]], dim=1
        )  # (B, 5, embed_dim)
        pooled = self.conv_pool(self.conv(channels))  # (B, 64, 16)
        theta_conv = self.mapping_conv(pooled.flatten(1))
        return self.a[1] * theta_linear + self.a[0] * theta_conv

    def extra_losses(self, source_features, text_features, query, target_features):
        decoder_img = F.mse_loss(self.image_decoder(query), source_features)
        decoder_text = F.mse_loss(self.text_decoder(query), text_features)
        back = self.compose_img_text_features(target_features, text_features, conjugate=True)
        rot_sym = self.matching_loss(
            self.normalization_layer(back), self.normalization_layer(source_features)
        )
        w = self.LOSS_WEIGHTS
        return {
            "decoder_img": w["decoder_img"] * decoder_img,
            "decoder_text": w["decoder_text"] * decoder_text,
            "rot_sym": w["rot_sym"] * rot_sym,
        }


MODELS = {
    "imgonly": SimpleModelImageOnly,
    "textonly": SimpleModelTextOnly,
    "concat": Concat,
    "tirg": TIRG,
    "tirg_lastconv": TIRGLastConv,
    "composeAE": ComposeAE,
}
