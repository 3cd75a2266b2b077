"""deltakd.train"""
