"""deltakd.eval"""
