"""What every part of resnet-serve shares and that depends on no part (docs/architecture.md, "Parts").

The image conventions (`imaging`: the formats training reads are the ones the server accepts), the model
folder and its manifest (`modeldir`), and the command-line conventions (`cli`). numpy and Pillow only: the client
installs this without Paddle.
"""

__version__ = "0.1.0"
