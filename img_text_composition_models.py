"""Image-text composition models: image-only, text-only, Concat, TIRG and TIRGLastConv.

All share a ResNet-18 image encoder (global average pooling, then a linear layer to
``embed_dim``) and take any text encoder from ``text_model`` (an ``nn.Module`` with ``out_dim``).
The models know nothing about datasets or losses: ``forward`` returns features, and the training
step in ``main.py`` turns them into loss terms.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision

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
        img_model = resnet18_backbone(pretrained)
        img_model.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        img_model.fc = torch.nn.Sequential(torch.nn.Linear(512, embed_dim))
        self.img_model = img_model
        self.text_model = text_encoder
        self.normalization_layer = NormalizationLayer(normalize_scale=4.0, learn_scale=True)

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
        query = self.compose_img_text_features(source_features, self.extract_text_feature(texts))
        target = self.extract_img_feature(target_imgs)
        return {
            "query": self.normalization_layer(query),
            "target": self.normalization_layer(target),
            "source_features": source_features,
            "extra_losses": {},
        }


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


MODELS = {
    "imgonly": SimpleModelImageOnly,
    "textonly": SimpleModelTextOnly,
    "concat": Concat,
    "tirg": TIRG,
    "tirg_lastconv": TIRGLastConv,
}
