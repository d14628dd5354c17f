"""oneday.runner"""
