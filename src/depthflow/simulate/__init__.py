"""An offline stand-in for Binance: seeded random-walk books on Binance's WS and REST paths."""

from depthflow.simulate.market import Market
from depthflow.simulate.server import Simulator, serve

__all__ = ["Market", "Simulator", "serve"]
