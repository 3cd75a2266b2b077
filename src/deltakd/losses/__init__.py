"""deltakd.losses"""
