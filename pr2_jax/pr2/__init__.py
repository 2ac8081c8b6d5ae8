"""Predictive Routing Replay: the route evolution predictor, its losses and feature cache."""
