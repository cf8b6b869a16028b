from setuptools import find_packages, setup


def readme():
    with open('README.md', encoding='utf-8') as f:
        return f.read()


setup(
    name='effbackbones',
    version='0.1.0',
    description='EfficientFormer, EfficientFormerV2, SwiftFormer, LeViT and Mobile-Former as '
                'OpenMMLab (mmdet 3.3 / mmseg 1.2.2) dense-prediction backbones',
    long_description=readme(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['effbackbones', 'effbackbones.*']),
    python_requires='>=3.9',
    # torch and mmcv are installed by tools/setup_env.sh in a fixed order (CPU torch first,
    # mmcv built with ops against it); listing them here would let pip pull CUDA builds.
    install_requires=['mmengine==0.10.7', 'numpy'],
    extras_require={
        'det': ['mmdet==3.3.0'],
        'seg': ['mmsegmentation==1.2.2', 'ftfy', 'regex'],
        'tests': ['pytest'],
    },
    license='Apache-2.0',
    zip_safe=False,
)
