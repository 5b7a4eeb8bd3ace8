"""Dense vs sparse inversion: speed, FLOPs and peak memory, ours vs a reference-style implementation.

    python benchmarks/inversion_speed.py --models deit_tiny_patch16_224,deit_base_patch16_224 --batch-size 8 --json out.json
    smi bench ...            (the same)

Run it alone on the machine: on a 2-core CPU another busy process slows torch ~10x.
"""

from smi_plugin.bench import main

if __name__ == "__main__":
    main()
