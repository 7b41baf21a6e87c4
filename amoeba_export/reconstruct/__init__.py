"""Closed-form reconstruction at extraction: width refits (least squares) and depth maps (ReplaceMe)."""

from .channels import (
    COMPENSATE_MODES,
    ChannelRefit,
    Compensator,
    LayerCovariance,
    LeastSquaresCompensation,
    MeanCompensation,
    solve_refit,
)
from .depth_maps import DepthMaps, DepthReconstruction, fit_depth_maps, fit_linear_map, removed_runs

__all__ = ["COMPENSATE_MODES", "ChannelRefit", "Compensator", "DepthMaps", "DepthReconstruction",
           "LayerCovariance", "LeastSquaresCompensation", "MeanCompensation", "fit_depth_maps",
           "fit_linear_map", "removed_runs", "solve_refit"]
