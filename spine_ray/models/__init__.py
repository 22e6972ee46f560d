"""Stage-1 (keypoint localizer) and stage-2 (severity grader) networks: plain nn.Modules, no Ray."""

from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.models.localizer import Localizer, LocalizerConfig

__all__ = ["Grader", "GraderConfig", "Localizer", "LocalizerConfig"]
