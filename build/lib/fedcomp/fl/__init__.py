"""Flower integration: the strategy, the ServerApp/ClientApp and the engines that run them."""
