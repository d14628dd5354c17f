"""oneday.planner"""
