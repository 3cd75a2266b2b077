"""deltakd.bench"""
