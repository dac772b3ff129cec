"""Ops: one public function per op, with torch / triton / cuda implementations behind it."""
