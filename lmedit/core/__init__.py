"""Pieces shared by every editing method (statistics, keys, targets, closed forms, distribution over
layers, transactions); no dispatch on a method's name inside."""
