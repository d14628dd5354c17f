"""oneday.studies"""
