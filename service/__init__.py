"""The online service (REST + gRPC over the versioned model repository). Built in the serving issue;
it will import neither torch nor ``training``."""
