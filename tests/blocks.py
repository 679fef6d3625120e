"""Code that makes a subprocess's imports of some packages fail, as on a machine without them."""


def block(*names: str) -> str:
    """Python source to run first: importing any of ``names`` (or their submodules) raises ImportError."""
    return (
        "import sys\n"
        "class Block:\n"
        f"    names = {tuple(names)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == n or name.startswith(n + '.') for n in self.names):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )


BLOCK_TORCH = block("torch", "transformers")
