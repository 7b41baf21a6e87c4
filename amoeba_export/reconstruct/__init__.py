"""Closed-form reconstruction at extraction: width refits (least squares) and depth maps (ReplaceMe).

Exports load lazily (see ``amoeba_export.lazy``): ``reconstruct.modes`` is torch-free, for the CLI's ``--help``."""

from ..lazy import lazy_exports

__all__ = ["COMPENSATE_MODES", "ChannelRefit", "Compensator", "DepthMaps", "DepthReconstruction",
           "LayerCovariance", "LeastSquaresCompensation", "MeanCompensation", "fit_depth_maps",
           "fit_linear_map", "removed_runs", "solve_refit"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "COMPENSATE_MODES": "modes",
    **dict.fromkeys(("ChannelRefit", "Compensator", "LayerCovariance", "LeastSquaresCompensation",
                     "MeanCompensation", "solve_refit"), "channels"),
    **dict.fromkeys(("DepthMaps", "DepthReconstruction", "fit_depth_maps", "fit_linear_map", "removed_runs"),
                    "depth_maps")})
