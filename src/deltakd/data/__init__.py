"""deltakd.data"""
